"""The wiring of the steps: KFP ops, the pipeline factory, local runs, the KFP API, the retrain watcher."""
