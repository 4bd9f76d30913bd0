-- Every statement flowfleet runs, by name. Python refers to them by the name after
-- "-- name:"; only identifiers are ever composed, and none of these needs one.

-- name: _candidates
-- The records a claim may take: pending, due, in priority then FIFO order. A record
-- whose worker died holding it may be what killed it, so it is claimed alone, ahead of
-- the rest: it cannot take a batch of innocent records down with it again.
--
-- Nothing is picked before the CTE "settled" has been read: a statement that also
-- completes records makes "settled" wait for its deletes (see complete_and_claim).
suspect AS (
    SELECT id FROM processing_queue
     WHERE flow_name = %(flow_name)s AND status = 'pending' AND abandoned_count > 0
       AND available_at <= (now() AT TIME ZONE 'UTC') AND EXISTS (SELECT FROM settled)
     ORDER BY priority DESC, id
     LIMIT 1
     FOR UPDATE SKIP LOCKED
), batch AS (
    SELECT id, priority FROM processing_queue
     WHERE flow_name = %(flow_name)s AND status = 'pending' AND abandoned_count = 0
       AND available_at <= (now() AT TIME ZONE 'UTC') AND EXISTS (SELECT FROM settled)
       AND NOT EXISTS (SELECT FROM suspect)
     ORDER BY priority DESC, id
     LIMIT %(batch_size)s
     FOR UPDATE SKIP LOCKED
)

-- name: _take_all
picked AS (
    SELECT id FROM suspect UNION ALL SELECT id FROM batch
)

-- name: _take_within_bytes
-- A worker holds a whole batch in memory: the batch ends before its payloads (as JSON
-- text) add up to more than max_batch_bytes. The first record is always taken, however
-- large, or it could never run. Rows left out stay pending. A separate statement from
-- the plain claim, which thus pays nothing for it.
budget AS (
    SELECT id FROM (
        SELECT b.id, octet_length(q.payload::text) AS bytes,
               sum(octet_length(q.payload::text))
                   OVER (ORDER BY b.priority DESC, b.id ROWS UNBOUNDED PRECEDING) AS running
          FROM batch b JOIN processing_queue q ON q.id = b.id
    ) sized
     WHERE running <= %(max_batch_bytes)s OR running = bytes
), picked AS (
    SELECT id FROM suspect UNION ALL SELECT id FROM budget
)

-- name: _stamp
-- The picked records become this claimer's, under one new token.
token AS (
    SELECT nextval('processing_queue_claim_token_seq') AS value
)
UPDATE processing_queue q
   SET status = 'processing', flow_instance_id = %(instance_id)s,
       claimed_at = (now() AT TIME ZONE 'UTC'), updated_at = (now() AT TIME ZONE 'UTC'),
       lease_expires_at = (now() AT TIME ZONE 'UTC') + make_interval(secs => %(lease_seconds)s),
       claim_token = (SELECT value FROM token)
  FROM picked
 WHERE q.id = picked.id
RETURNING q.id, q.payload, q.retry_count, q.claim_token, q.created_at, q.priority;

-- name: claim
-- One statement: pick, lock and stamp. SKIP LOCKED lets concurrent claimers pass each
-- other's locked rows instead of queueing behind them; the token fences completions.
WITH settled AS (SELECT), {{_candidates}}, {{_take_all}}, {{_stamp}}

-- name: claim_within_bytes
WITH settled AS (SELECT), {{_candidates}}, {{_take_within_bytes}}, {{_stamp}}

-- name: _archive
-- Completed rows, from a CTE "done" that returns the deleted queue row and its result,
-- into processing_history: the one place that lists history's columns for completions.
INSERT INTO processing_history (id, flow_name, payload, status, flow_instance_id, claimed_at,
                                completed_at, error_message, retry_count, created_at,
                                updated_at, priority, dedup_key, result, abandoned_count)
SELECT id, flow_name, payload, 'completed', flow_instance_id, claimed_at, (now() AT TIME ZONE 'UTC'),
       error_message, retry_count, created_at, (now() AT TIME ZONE 'UTC'), priority, dedup_key, result,
       abandoned_count
  FROM done

-- name: complete_and_claim
-- The worker's steady state: finish the last batch and take the next in one round trip
-- and one commit. Completed rows leave the live queue for processing_history.
--
-- Lock order: the deletes run to the end before the claim locks anything. A claim's
-- SKIP LOCKED scan may still lock rows it does not take: a pending row claimed by
-- another worker after this statement's snapshot is rechecked (EvalPlanQual) on its
-- new version, which stays locked until this statement ends, and the update chain is
-- followed without regard to SKIP LOCKED. Deleting after claiming thus waited for our
-- own rows while holding other workers' rows, and two such statements deadlocked;
-- deleting first means we hold only our own rows while we wait.
WITH {{_settle}}, {{_candidates}}, {{_take_all}}, {{_stamp}}

-- name: complete_and_claim_within_bytes
WITH {{_settle}}, {{_candidates}}, {{_take_within_bytes}}, {{_stamp}}

-- name: _settle
-- The completions of complete_and_claim; "settled" is read only once they are done.
done AS (
    DELETE FROM processing_queue q
     USING unnest(%(done_ids)s::bigint[], %(done_tokens)s::bigint[]) AS d(id, token)
     WHERE q.id = d.id AND q.claim_token = d.token AND q.status = 'processing'
    RETURNING q.*, NULL::jsonb AS result
), archived AS (
    {{_archive}}
), settled AS (
    SELECT count(*) FROM done
)

-- name: complete
-- Fenced: a row whose token changed (taken back, re-claimed) is not touched.
WITH done AS (
    DELETE FROM processing_queue q
     USING unnest(%(ids)s::bigint[], %(tokens)s::bigint[], %(results)s::jsonb[])
           AS d(id, token, result)
     WHERE q.id = d.id AND q.claim_token = d.token AND q.status = 'processing'
    RETURNING q.*, d.result
)
{{_archive}}
RETURNING id;

-- name: complete_by_instance
-- For callers that lost the token (the seed's mark_record_completed(id) from a fresh
-- processor): still fenced, by the claimer's instance id and the in-flight status.
WITH done AS (
    DELETE FROM processing_queue q
     WHERE q.id = %(id)s AND q.flow_instance_id = %(instance_id)s AND q.status = 'processing'
    RETURNING q.*, %(result)s::jsonb AS result
)
{{_archive}}
RETURNING id;

-- name: fail
-- Retry with exponential backoff and jitter while retries remain, else fail for good.
-- The jitter spreads a burst of failures so their retries do not land together.
UPDATE processing_queue
   SET status = CASE WHEN retry_count < %(max_retries)s THEN 'pending' ELSE 'failed' END,
       retry_count = CASE WHEN retry_count < %(max_retries)s THEN retry_count + 1
                          ELSE retry_count END,
       available_at = (now() AT TIME ZONE 'UTC') + make_interval(secs =>
           LEAST(%(backoff_cap)s::float8,
                 %(backoff_base)s::float8 * power(2, LEAST(retry_count, 60)))
           * (0.5 + random() / 2)),
       error_message = %(error_message)s,
       error_details = %(error_details)s,
       flow_instance_id = CASE WHEN retry_count < %(max_retries)s THEN NULL
                               ELSE flow_instance_id END,
       claim_token = NULL, lease_expires_at = NULL,
       updated_at = (now() AT TIME ZONE 'UTC')
 WHERE id = %(id)s AND status = 'processing'
   AND (claim_token = %(token)s
        OR (%(token)s::bigint IS NULL AND flow_instance_id = %(instance_id)s))
RETURNING id, status, retry_count;

-- name: release
-- Hand claimed records back untouched (graceful shutdown): no retry is spent.
UPDATE processing_queue q
   SET status = 'pending', flow_instance_id = NULL, claim_token = NULL,
       lease_expires_at = NULL, claimed_at = NULL, updated_at = (now() AT TIME ZONE 'UTC')
  FROM unnest(%(ids)s::bigint[], %(tokens)s::bigint[]) AS d(id, token)
 WHERE q.id = d.id AND q.claim_token = d.token AND q.status = 'processing'
RETURNING q.id;

-- name: heartbeat
-- The lease keeper never waits for a row lock: a row locked now is being completed,
-- released or rechecked by a claim, and is renewed on the next tick if it is still ours.
-- Waiting here could join a deadlock with our own claim loop, or hang on a frozen worker.
WITH mine AS (
    SELECT q.id
      FROM processing_queue q
      JOIN unnest(%(ids)s::bigint[], %(tokens)s::bigint[]) AS d(id, token)
        ON q.id = d.id AND q.claim_token = d.token
     WHERE q.status = 'processing'
     ORDER BY q.id
       FOR UPDATE OF q SKIP LOCKED
)
UPDATE processing_queue q
   SET lease_expires_at = (now() AT TIME ZONE 'UTC') + make_interval(secs => %(lease_seconds)s)
  FROM mine
 WHERE q.id = mine.id
RETURNING q.id;

-- name: _abandon
-- Records of a claimer that stopped (the CTE "orphans", locked) go back to pending with
-- their retry count unchanged: the worker died, the record did not fail. Clearing the
-- token fences the dead claimer's late answer. A record abandoned max_abandons times is
-- failed instead: it is what kills them.
UPDATE processing_queue q
   SET abandoned_count = q.abandoned_count + 1,
       status = CASE WHEN q.abandoned_count + 1 >= %(max_abandons)s THEN 'failed'
                     ELSE 'pending' END,
       error_message = CASE WHEN q.abandoned_count + 1 >= %(max_abandons)s
                            THEN format('abandoned %%s times: the worker holding it'
                                        ' stopped each time (last: %%s), so it may be'
                                        ' what stops them',
                                        q.abandoned_count + 1, q.flow_instance_id)
                            ELSE q.error_message END,
       flow_instance_id = CASE WHEN q.abandoned_count + 1 >= %(max_abandons)s
                               THEN q.flow_instance_id END,
       claim_token = NULL, lease_expires_at = NULL, claimed_at = NULL,
       updated_at = (now() AT TIME ZONE 'UTC')
  FROM orphans
 WHERE q.id = orphans.id
RETURNING q.id, q.status

-- name: release_orphans
-- Records whose claimer stopped renewing its lease, or (given the seed's timeout) claimed
-- longer ago than it.
--
-- A lease that ran out while the server was down or just restarting says nothing about
-- its claimer: nobody could renew. Leases count only once the server has been up for
-- reconnect_seconds (a lease's length: time for every live worker to reconnect and
-- renew), so a database restart is not taken for the death of every worker.
--
-- SKIP LOCKED: a row still locked belongs to a claimer that is busy with it (or frozen
-- inside a transaction, which the server's idle-in-transaction timeout ends); every
-- worker's keeper runs this, and none may wait on another worker's locks.
WITH orphans AS (
    SELECT id FROM processing_queue
     WHERE status = 'processing'
       AND ((lease_expires_at < (now() AT TIME ZONE 'UTC')
             AND pg_postmaster_start_time()
                 < now() - make_interval(secs => %(reconnect_seconds)s::float8))
            OR claimed_at < (now() AT TIME ZONE 'UTC') - make_interval(secs => %(timeout_seconds)s::float8))
       -- Without a timeout only expired leases count: a record that runs for hours
       -- under a renewed lease is alive, however old its claim.
       AND (%(flow_name)s::text IS NULL OR flow_name = %(flow_name)s)
     ORDER BY id
       FOR UPDATE SKIP LOCKED
)
{{_abandon}};

-- name: release_instance
-- Every claim an instance holds, at once: its process is gone (a container restarted
-- under the same pod name after an OOM kill, or a deleted pod). Counted as abandoned,
-- since the record may be what ended it.
WITH orphans AS (
    SELECT id FROM processing_queue
     WHERE status = 'processing' AND flow_name = %(flow_name)s
       AND flow_instance_id = %(instance_id)s
     ORDER BY id
       FOR UPDATE SKIP LOCKED
)
{{_abandon}};

-- name: stats_by_flow
-- A table adopted from the seed may hold completed rows written in place after the
-- migration, and statuses outside the four (its CHECK constraint is not added to an
-- existing table): those are counted too, so that totals match the table.
SELECT flow_name,
       count(*) FILTER (WHERE status = 'pending') AS pending_records,
       count(*) FILTER (WHERE status = 'processing') AS processing_records,
       count(*) FILTER (WHERE status = 'failed') AS failed_records,
       count(*) FILTER (WHERE status = 'completed') AS completed_in_queue,
       count(*) FILTER (WHERE status NOT IN ('pending', 'processing', 'completed', 'failed'))
           AS other_records,
       count(*) FILTER (WHERE status = 'pending' AND available_at <= (now() AT TIME ZONE 'UTC'))
           AS ready_records
  FROM processing_queue
 WHERE %(flow_name)s::text IS NULL OR flow_name = %(flow_name)s
 GROUP BY flow_name;

-- name: completed_by_flow
SELECT flow_name, count(*) AS completed_records
  FROM processing_history
 WHERE %(flow_name)s::text IS NULL OR flow_name = %(flow_name)s
 GROUP BY flow_name;

-- name: cleanup_cutoff
-- Retention runs in batches; the horizon is fixed once, at its start.
SELECT (now() AT TIME ZONE 'UTC') - make_interval(secs => %(older_than_seconds)s::float8);

-- name: history_flows
-- The flows with history, by a loose scan of (flow_name, completed_at): one index probe
-- per flow rather than a pass over every record.
WITH RECURSIVE flows AS (
    (SELECT flow_name FROM processing_history ORDER BY flow_name LIMIT 1)
    UNION ALL
    SELECT (SELECT h.flow_name FROM processing_history h
             WHERE h.flow_name > flows.flow_name ORDER BY h.flow_name LIMIT 1)
      FROM flows WHERE flows.flow_name IS NOT NULL
)
SELECT flow_name FROM flows WHERE flow_name IS NOT NULL;

-- name: cleanup_completed_batch
-- One short transaction: at most batch_size of one flow's oldest records, found through
-- (flow_name, completed_at). Completions only append to history and claims never read
-- it, so nothing waits on these deletes.
DELETE FROM processing_history
 WHERE id IN (SELECT id FROM processing_history
               WHERE flow_name = %(flow_name)s AND completed_at < %(cutoff)s
               ORDER BY completed_at
               LIMIT %(batch_size)s);

-- name: requeue_failed
UPDATE processing_queue
   SET status = 'pending', retry_count = 0, abandoned_count = 0, available_at = (now() AT TIME ZONE 'UTC'),
       flow_instance_id = NULL, claim_token = NULL, lease_expires_at = NULL,
       claimed_at = NULL, updated_at = (now() AT TIME ZONE 'UTC')
 WHERE status = 'failed' AND flow_name = %(flow_name)s
   AND (%(ids)s::bigint[] IS NULL OR id = ANY(%(ids)s::bigint[]))
RETURNING id;

-- name: enqueue_from_staging
-- Dedup path: COPY lands in a temporary table, then one INSERT drops keys already live.
INSERT INTO processing_queue (flow_name, payload, priority, available_at, dedup_key)
SELECT flow_name, payload, priority, available_at, dedup_key FROM flowfleet_enqueue_staging
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
 WHERE updated_at > (now() AT TIME ZONE 'UTC') - make_interval(secs => %(window_seconds)s::float8)
 GROUP BY flow_name;

-- name: session_setup
-- Run on each direct connection, never through a transaction pooler (where it would land
-- on whichever server connection served it, and on other clients' work after it); there
-- the bounds belong to the worker's role (docs/capacity.md). No statement depends on the
-- session's time zone: queue timestamps are TIMESTAMP (the seed's type) holding UTC, and
-- every "now" is written (now() AT TIME ZONE 'UTC').
--
-- A frozen client (SIGSTOP, a paused VM, a cut network) inside a transaction holds its
-- row locks until the server ends its session: these bounds make the server do so on
-- its own, and its records then come back like any dead claimer's. Each applies only
-- where nobody chose a value (server, database, role or PGOPTIONS): a processor that
-- takes `conn` keeps its transaction open while it runs, so a site whose records run
-- longer raises idle_in_transaction_session_timeout for the worker's role.
SELECT (SELECT count(set_config(bound.name, bound.value, false))
          FROM (VALUES ('idle_in_transaction_session_timeout', '300s'),
                       -- Server-side TCP keepalives: a peer that vanished is noticed in
                       -- about a minute rather than the kernel's two hours.
                       ('tcp_keepalives_idle', '30'),
                       ('tcp_keepalives_interval', '10'),
                       ('tcp_keepalives_count', '3')) AS bound(name, value)
          JOIN pg_settings ON pg_settings.name = bound.name
         WHERE pg_settings.source = 'default') AS bounds_set;

-- name: keeper_lock_timeout
SET LOCAL lock_timeout = '2s';

-- name: ping
SELECT 1;

-- name: listen
LISTEN flowfleet_queue;

-- name: copy_records
COPY processing_queue (flow_name, payload) FROM STDIN;

-- name: staging_table
-- Made and dropped inside the enqueue's transaction: through a transaction pooler the
-- next transaction may run on another server connection, and a table left behind would
-- be another client's surprise.
CREATE TEMPORARY TABLE flowfleet_enqueue_staging (
    flow_name text, payload jsonb, priority smallint, available_at timestamp, dedup_key text
) ON COMMIT DROP;

-- name: copy_staging
COPY flowfleet_enqueue_staging FROM STDIN;

-- name: available_after
SELECT (now() AT TIME ZONE 'UTC') + make_interval(secs => %(delay_seconds)s::float8);

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
       count(*) FILTER (WHERE lease_expires_at < (now() AT TIME ZONE 'UTC')) AS expired_records,
       min(claimed_at) AS oldest_claim
  FROM processing_queue
 WHERE status = 'processing' AND (%(flow_name)s::text IS NULL OR flow_name = %(flow_name)s)
 GROUP BY flow_name, flow_instance_id
 ORDER BY flow_name, flow_instance_id;

-- name: records_by_id
-- Where records are now (live queue or history), for a requeue that names ids.
SELECT id, flow_name, status FROM processing_records WHERE id = ANY(%(ids)s::bigint[]);

-- name: release_instance_everywhere
-- `flowfleet cleanup --instance ID`: that claimer is known to be gone (say a script killed
-- holding Python-API claims, which are not renewed and last cleanup_timeout_hours). Its
-- records go back now, no retry spent; the cleared token fences a late answer from it.
UPDATE processing_queue
   SET status = 'pending', flow_instance_id = NULL, claim_token = NULL,
       lease_expires_at = NULL, claimed_at = NULL, updated_at = (now() AT TIME ZONE 'UTC')
 WHERE status = 'processing' AND flow_instance_id = %(instance_id)s
RETURNING id;

-- name: take_depth_reporting
-- One worker per flow and database exports flowfleet_queue_depth, so that summing it over
-- pods does not multiply it: the one whose session holds this lock. It goes with the
-- session (a worker that stops or loses its connection), and the next to ask takes it.
SELECT pg_try_advisory_lock(hashtext('flowfleet_queue_depth'), hashtext(%(flow_name)s));

-- name: depth_of_flows
-- The operator's tick: every flow it scales on one database, in one statement. The live
-- queue holds only unfinished work; recent completions come from history through its
-- (flow_name, completed_at) index, and busy instances from the in-flight rows alone.
WITH counts AS (
    SELECT flow_name,
           count(*) FILTER (WHERE status = 'pending') AS pending_records,
           count(*) FILTER (WHERE status = 'pending' AND available_at <= (now() AT TIME ZONE 'UTC'))
               AS ready_records,
           count(*) FILTER (WHERE status = 'processing') AS processing_records,
           count(*) FILTER (WHERE status = 'failed') AS failed_records
      FROM processing_queue
     WHERE flow_name = ANY(%(flow_names)s::text[])
     GROUP BY flow_name
), busy AS (
    SELECT flow_name, count(DISTINCT flow_instance_id) AS busy_instances
      FROM processing_queue
     WHERE status = 'processing' AND flow_name = ANY(%(flow_names)s::text[])
     GROUP BY flow_name
), done AS (
    SELECT flow_name, count(*) AS completed_recently,
           count(DISTINCT flow_instance_id) AS completing_instances
      FROM processing_history
     WHERE flow_name = ANY(%(flow_names)s::text[])
       AND completed_at > (now() AT TIME ZONE 'UTC') - make_interval(secs => %(window_seconds)s::float8)
     GROUP BY flow_name
)
SELECT f.flow_name,
       coalesce(c.pending_records, 0) AS pending_records,
       coalesce(c.ready_records, 0) AS ready_records,
       coalesce(c.processing_records, 0) AS processing_records,
       coalesce(c.failed_records, 0) AS failed_records,
       coalesce(b.busy_instances, 0) AS busy_instances,
       coalesce(d.completed_recently, 0) AS completed_recently,
       coalesce(d.completing_instances, 0) AS completing_instances
  FROM unnest(%(flow_names)s::text[]) AS f(flow_name)
  LEFT JOIN counts c USING (flow_name)
  LEFT JOIN busy b USING (flow_name)
  LEFT JOIN done d USING (flow_name);

-- name: delete_flow_queue
-- Forget a flow's live records, whatever their status (the demo's clean-up of its own
-- throwaway flow; nothing else deletes unfinished work).
DELETE FROM processing_queue WHERE flow_name = %(flow_name)s;

-- name: delete_flow_history
-- Forget a flow's finished records (the demo's clean-up, after delete_flow_queue).
DELETE FROM processing_history WHERE flow_name = %(flow_name)s;
