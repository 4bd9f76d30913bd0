"""flowfleet: a fenced PostgreSQL queue for Prefect record-processing flows."""

__version__ = "0.1.0"
