-- 0004: one index on the job ID instead of two.
--
-- find_active (the live execution of a requester's job) used its own index on
-- (requester, job_id); it now reads `executions_job` (job_id, ord), checking the
-- requester and the state on the job's rows, which are few. Every new execution wrote
-- both indexes at a random leaf (job IDs are the requesters'); it now writes one.

DROP INDEX executions_requester_job;
