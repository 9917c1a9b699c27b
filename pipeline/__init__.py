"""The Kubeflow pipeline of MulCon (`pipeline.pipeline`) and its command line (`python -m pipeline`)."""
