-- Every statement flowfleet runs, by name. Python refers to them by the name after
-- "-- name:"; only identifiers are ever composed, and none of these needs one.

-- name: _pick
-- The records a claim takes: pending, due, in priority then FIFO order. A record whose
-- worker died holding it may be what killed it, so it is claimed alone, ahead of the
-- rest: it cannot take a batch of innocent records down with it again.
suspect AS (
    SELECT id FROM processing_queue
     WHERE flow_name = %(flow_name)s AND status = 'pending' AND abandoned_count > 0
       AND available_at <= LOCALTIMESTAMP
     ORDER BY priority DESC, id
     LIMIT 1
     FOR UPDATE SKIP LOCKED
), batch AS (
    SELECT id FROM processing_queue
     WHERE flow_name = %(flow_name)s AND status = 'pending' AND abandoned_count = 0
       AND available_at <= LOCALTIMESTAMP AND NOT EXISTS (SELECT FROM suspect)
     ORDER BY priority DESC, id
     LIMIT %(batch_size)s
     FOR UPDATE SKIP LOCKED
), picked AS (
    SELECT id FROM suspect UNION ALL SELECT id FROM batch
), token AS (
    SELECT nextval('processing_queue_claim_token_seq') AS value
)
UPDATE processing_queue q
   SET status = 'processing', flow_instance_id = %(instance_id)s,
       claimed_at = LOCALTIMESTAMP, updated_at = LOCALTIMESTAMP,
       lease_expires_at = LOCALTIMESTAMP + make_interval(secs => %(lease_seconds)s),
       claim_token = (SELECT value FROM token)
  FROM picked
 WHERE q.id = picked.id
RETURNING q.id, q.payload, q.retry_count, q.claim_token, q.created_at, q.priority;

-- name: claim
-- One statement: pick, lock and stamp. SKIP LOCKED lets concurrent claimers pass each
-- other's locked rows instead of queueing behind them; the token fences completions.
WITH {{_pick}}

-- name: complete_and_claim
-- The worker's steady state: finish the last batch and take the next in one round trip
-- and one commit. Completed rows leave the live queue for processing_history.
WITH done AS (
    DELETE FROM processing_queue q
     USING unnest(%(done_ids)s::bigint[], %(done_tokens)s::bigint[]) AS d(id, token)
     WHERE q.id = d.id AND q.claim_token = d.token AND q.status = 'processing'
    RETURNING q.*
), archived AS (
    INSERT INTO processing_history (id, flow_name, payload, status, flow_instance_id,
                                    claimed_at, completed_at, error_message, retry_count,
                                    created_at, updated_at, priority, dedup_key,
                                    abandoned_count)
    SELECT id, flow_name, payload, 'completed', flow_instance_id, claimed_at, LOCALTIMESTAMP,
           error_message, retry_count, created_at, LOCALTIMESTAMP, priority, dedup_key,
           abandoned_count
      FROM done
), {{_pick}}

-- name: complete
-- Fenced: a row whose token changed (taken back, re-claimed) is not touched.
WITH done AS (
    DELETE FROM processing_queue q
     USING unnest(%(ids)s::bigint[], %(tokens)s::bigint[], %(results)s::jsonb[])
           AS d(id, token, result)
     WHERE q.id = d.id AND q.claim_token = d.token AND q.status = 'processing'
    RETURNING q.*, d.result
)
INSERT INTO processing_history (id, flow_name, payload, status, flow_instance_id, claimed_at,
                                completed_at, error_message, retry_count, created_at,
                                updated_at, priority, dedup_key, result, abandoned_count)
SELECT id, flow_name, payload, 'completed', flow_instance_id, claimed_at, LOCALTIMESTAMP,
       error_message, retry_count, created_at, LOCALTIMESTAMP, priority, dedup_key, result,
       abandoned_count
  FROM done
RETURNING id;

-- name: complete_by_instance
-- For callers that lost the token (the seed's mark_record_completed(id) from a fresh
-- processor): still fenced, by the claimer's instance id and the in-flight status.
WITH done AS (
    DELETE FROM processing_queue q
     WHERE q.id = %(id)s AND q.flow_instance_id = %(instance_id)s AND q.status = 'processing'
    RETURNING q.*
)
INSERT INTO processing_history (id, flow_name, payload, status, flow_instance_id, claimed_at,
                                completed_at, error_message, retry_count, created_at,
                                updated_at, priority, dedup_key, result, abandoned_count)
SELECT id, flow_name, payload, 'completed', flow_instance_id, claimed_at, LOCALTIMESTAMP,
       error_message, retry_count, created_at, LOCALTIMESTAMP, priority, dedup_key,
       %(result)s::jsonb, abandoned_count
  FROM done
RETURNING id;

-- name: fail
-- Retry with exponential backoff and jitter while retries remain, else fail for good.
-- The jitter spreads a burst of failures so their retries do not land together.
UPDATE processing_queue
   SET status = CASE WHEN retry_count < %(max_retries)s THEN 'pending' ELSE 'failed' END,
       retry_count = CASE WHEN retry_count < %(max_retries)s THEN retry_count + 1
                          ELSE retry_count END,
       available_at = LOCALTIMESTAMP + make_interval(secs =>
           LEAST(%(backoff_cap)s::float8,
                 %(backoff_base)s::float8 * power(2, LEAST(retry_count, 60)))
           * (0.5 + random() / 2)),
       error_message = %(error_message)s,
       error_details = %(error_details)s,
       flow_instance_id = CASE WHEN retry_count < %(max_retries)s THEN NULL
                               ELSE flow_instance_id END,
       claim_token = NULL, lease_expires_at = NULL,
       updated_at = LOCALTIMESTAMP
 WHERE id = %(id)s AND status = 'processing'
   AND (claim_token = %(token)s
        OR (%(token)s::bigint IS NULL AND flow_instance_id = %(instance_id)s))
RETURNING id, status, retry_count;

-- name: release
-- Hand claimed records back untouched (graceful shutdown): no retry is spent.
UPDATE processing_queue q
   SET status = 'pending', flow_instance_id = NULL, claim_token = NULL,
       lease_expires_at = NULL, claimed_at = NULL, updated_at = LOCALTIMESTAMP
  FROM unnest(%(ids)s::bigint[], %(tokens)s::bigint[]) AS d(id, token)
 WHERE q.id = d.id AND q.claim_token = d.token AND q.status = 'processing'
RETURNING q.id;

-- name: heartbeat
UPDATE processing_queue q
   SET lease_expires_at = LOCALTIMESTAMP + make_interval(secs => %(lease_seconds)s)
  FROM unnest(%(ids)s::bigint[], %(tokens)s::bigint[]) AS d(id, token)
 WHERE q.id = d.id AND q.claim_token = d.token AND q.status = 'processing'
RETURNING q.id;

-- name: release_orphans
-- Records whose claimer stopped renewing its lease, or (given the seed's timeout) claimed
-- longer ago than it, go back to pending with their retry count unchanged: the worker
-- died, the record did not fail. Clearing the token fences the dead claimer's late
-- answer. A record abandoned max_abandons times is failed instead: it is what kills them.
UPDATE processing_queue
   SET abandoned_count = abandoned_count + 1,
       status = CASE WHEN abandoned_count + 1 >= %(max_abandons)s THEN 'failed'
                     ELSE 'pending' END,
       error_message = CASE WHEN abandoned_count + 1 >= %(max_abandons)s
                            THEN format('abandoned %%s times: the worker holding it'
                                        ' stopped each time (last: %%s), so it may be'
                                        ' what stops them',
                                        abandoned_count + 1, flow_instance_id)
                            ELSE error_message END,
       flow_instance_id = CASE WHEN abandoned_count + 1 >= %(max_abandons)s
                               THEN flow_instance_id END,
       claim_token = NULL, lease_expires_at = NULL, claimed_at = NULL,
       updated_at = LOCALTIMESTAMP
 WHERE status = 'processing'
   AND (lease_expires_at < LOCALTIMESTAMP
        OR claimed_at < LOCALTIMESTAMP - make_interval(secs => %(timeout_seconds)s::float8))
   -- Without a timeout only expired leases count: a record that runs for hours under a
   -- renewed lease is alive, however old its claim.
   AND (%(flow_name)s::text IS NULL OR flow_name = %(flow_name)s)
RETURNING id, status;

-- name: stats_by_flow
SELECT flow_name,
       count(*) FILTER (WHERE status = 'pending') AS pending_records,
       count(*) FILTER (WHERE status = 'processing') AS processing_records,
       count(*) FILTER (WHERE status = 'failed') AS failed_records,
       count(*) FILTER (WHERE status = 'pending' AND available_at <= LOCALTIMESTAMP)
           AS ready_records
  FROM processing_queue
 WHERE %(flow_name)s::text IS NULL OR flow_name = %(flow_name)s
 GROUP BY flow_name;

-- name: completed_by_flow
SELECT flow_name, count(*) AS completed_records
  FROM processing_history
 WHERE %(flow_name)s::text IS NULL OR flow_name = %(flow_name)s
 GROUP BY flow_name;

-- name: cleanup_completed
DELETE FROM processing_history
 WHERE completed_at < LOCALTIMESTAMP - make_interval(secs => %(older_than_seconds)s::float8);

-- name: requeue_failed
UPDATE processing_queue
   SET status = 'pending', retry_count = 0, abandoned_count = 0, available_at = LOCALTIMESTAMP,
       flow_instance_id = NULL, claim_token = NULL, lease_expires_at = NULL,
       claimed_at = NULL, updated_at = LOCALTIMESTAMP
 WHERE status = 'failed' AND flow_name = %(flow_name)s
   AND (%(ids)s::bigint[] IS NULL OR id = ANY(%(ids)s::bigint[]))
RETURNING id;

-- name: enqueue_from_staging
-- Dedup path: COPY lands in a temporary table, then one INSERT drops keys already live.
INSERT INTO processing_queue (flow_name, payload, priority, available_at, dedup_key)
SELECT flow_name, payload, priority, available_at, dedup_key FROM flowfleet_staging
ON CONFLICT (flow_name, dedup_key) WHERE dedup_key IS NOT NULL DO NOTHING;

-- name: notify
SELECT pg_notify('flowfleet_queue', %(flow_name)s);

-- name: performance
SELECT flow_name,
       count(*) FILTER (WHERE status = 'completed') AS completed,
       count(*) FILTER (WHERE status = 'failed') AS failed,
       count(*) FILTER (WHERE status IN ('pending', 'processing')) AS in_progress,
       avg(EXTRACT(EPOCH FROM (completed_at - claimed_at)))
           FILTER (WHERE status = 'completed') AS avg_processing_seconds,
       min(claimed_at) AS first_claimed_at,
       max(completed_at) AS last_completed_at
  FROM processing_records
 WHERE updated_at > LOCALTIMESTAMP - make_interval(secs => %(window_seconds)s::float8)
 GROUP BY flow_name;

-- name: session_setup
-- Queue timestamps are TIMESTAMP (the seed's type) compared with LOCALTIMESTAMP, so every
-- session must agree on one zone or leases would drift by the zone offset.
SET TIME ZONE 'UTC';

-- name: ping
SELECT 1;

-- name: listen
LISTEN flowfleet_queue;

-- name: copy_records
COPY processing_queue (flow_name, payload) FROM STDIN;

-- name: staging_table
CREATE TEMPORARY TABLE IF NOT EXISTS flowfleet_staging (
    flow_name text, payload jsonb, priority smallint, available_at timestamp, dedup_key text
) ON COMMIT DELETE ROWS;

-- name: copy_staging
COPY flowfleet_staging FROM STDIN;

-- name: available_after
SELECT LOCALTIMESTAMP + make_interval(secs => %(delay_seconds)s::float8);

-- name: migrations_lock
-- One fixed key ("flow"): every migrator of every flowfleet version serialises on it.
SELECT pg_advisory_xact_lock(1718382455);

-- name: migrations_table
CREATE TABLE IF NOT EXISTS flowfleet_migrations (
    version    INTEGER PRIMARY KEY,
    name       TEXT NOT NULL,
    applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- name: migrations_applied
SELECT version FROM flowfleet_migrations;

-- name: migration_record
INSERT INTO flowfleet_migrations (version, name) VALUES (%(version)s, %(name)s);

-- name: migrations_exist
SELECT to_regclass('flowfleet_migrations') IS NOT NULL;

-- name: schema_version
SELECT coalesce(max(version), 0) FROM flowfleet_migrations;

-- name: failed_records
-- `flowfleet failed FLOW`: what failed and why, so `requeue --id` needs no psql.
SELECT id, retry_count, abandoned_count, updated_at, error_message,
       count(*) OVER () AS total_failed
  FROM processing_queue
 WHERE status = 'failed' AND flow_name = %(flow_name)s
 ORDER BY id
 LIMIT %(limit)s;

-- name: processing_by_instance
-- `flowfleet status`: which instance (pod) holds how many records, and how many of those
-- claims have run out of lease (their holder stopped renewing: likely gone).
SELECT flow_name, flow_instance_id AS instance_id, count(*) AS processing_records,
       count(*) FILTER (WHERE lease_expires_at < LOCALTIMESTAMP) AS expired_records,
       min(claimed_at) AS oldest_claim
  FROM processing_queue
 WHERE status = 'processing' AND (%(flow_name)s::text IS NULL OR flow_name = %(flow_name)s)
 GROUP BY flow_name, flow_instance_id
 ORDER BY flow_name, flow_instance_id;

-- name: records_by_id
-- Where records are now (live queue or history), for a requeue that names ids.
SELECT id, flow_name, status FROM processing_records WHERE id = ANY(%(ids)s::bigint[]);

-- name: release_instance
-- `flowfleet cleanup --instance ID`: that claimer is known to be gone (say a script killed
-- holding Python-API claims, which are not renewed and last cleanup_timeout_hours). Its
-- records go back now, no retry spent; the cleared token fences a late answer from it.
UPDATE processing_queue
   SET status = 'pending', flow_instance_id = NULL, claim_token = NULL,
       lease_expires_at = NULL, claimed_at = NULL, updated_at = LOCALTIMESTAMP
 WHERE status = 'processing' AND flow_instance_id = %(instance_id)s
RETURNING id;

-- name: take_depth_reporting
-- One worker per flow and database exports flowfleet_queue_depth, so that summing it over
-- pods does not multiply it: the one whose session holds this lock. It goes with the
-- session (a worker that stops or loses its connection), and the next to ask takes it.
SELECT pg_try_advisory_lock(hashtext('flowfleet_queue_depth'), hashtext(%(flow_name)s));
