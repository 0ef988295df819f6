"""The pipeline steps, one module each: plain functions that the KFP ops, the CLI and tests call."""
