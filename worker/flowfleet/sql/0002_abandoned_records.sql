-- How many times a record's worker died (its lease ran out) while holding it. Not a
-- retry: the record did not fail. But a record that kills every worker that runs it
-- (out of memory, a crash in native code) would otherwise come back forever, and take a
-- batch of innocent records down with it each time.
ALTER TABLE processing_queue
    ADD COLUMN IF NOT EXISTS abandoned_count INTEGER NOT NULL DEFAULT 0;

ALTER TABLE processing_history
    ADD COLUMN IF NOT EXISTS abandoned_count INTEGER NOT NULL DEFAULT 0;

-- Abandoned records are claimed alone, ahead of the rest; this index holds only them.
CREATE INDEX IF NOT EXISTS processing_queue_suspect_idx
    ON processing_queue (flow_name, priority DESC, id)
    WHERE status = 'pending' AND abandoned_count > 0;
