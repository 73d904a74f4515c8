"""The Spark glue: the session, the tables, a stage's context and the stages themselves (`stages/`).
Imports the core and `udfs/`, never the application layer."""
