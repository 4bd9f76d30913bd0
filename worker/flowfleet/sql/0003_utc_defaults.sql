-- Queue timestamps hold UTC whatever the session's time zone: through a transaction
-- pooler (PgBouncer) no session setting can be relied on, so the defaults say UTC
-- themselves instead of following the session (NOW() cast to TIMESTAMP). Existing rows
-- were written by sessions set to UTC and stay as they are.
ALTER TABLE processing_queue
    ALTER COLUMN created_at   SET DEFAULT (now() AT TIME ZONE 'UTC'),
    ALTER COLUMN updated_at   SET DEFAULT (now() AT TIME ZONE 'UTC'),
    ALTER COLUMN available_at SET DEFAULT (now() AT TIME ZONE 'UTC');

ALTER TABLE processing_history
    ALTER COLUMN completed_at SET DEFAULT (now() AT TIME ZONE 'UTC'),
    ALTER COLUMN updated_at   SET DEFAULT (now() AT TIME ZONE 'UTC');
