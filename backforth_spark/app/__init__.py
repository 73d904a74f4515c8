"""The application: the pipeline that runs stages, the `backforth` command, status, MLflow tracking and
the throwaway standalone cluster of tests and benchmarks."""
