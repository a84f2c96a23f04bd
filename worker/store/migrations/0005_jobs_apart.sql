-- 0005: each execution's job in a table of its own, written once.
--
-- The job (~1.1 of ~2.3 kB of a noop execution's document) never changes after the
-- bid, but it was in the document that every update rewrites. A 2.3 kB row takes a page
-- of its own, so each of an execution's updates put a whole page in its commit's WAL:
-- 7 of the 15 pages a noop job wrote. Without the job, ~3 rows share a page and the
-- updates of a group commit share pages with each other. `doc` keeps a `"job":null`
-- in the job's place; reading an execution puts the job back there.

CREATE TABLE jobs (
    execution_ord INTEGER PRIMARY KEY REFERENCES executions (ord) ON DELETE CASCADE,
    job           BLOB    NOT NULL  -- the Job, JSON, as stored at creation
);

INSERT INTO jobs (execution_ord, job)
SELECT ord, CAST(json_extract(CAST(doc AS TEXT), '$.job') AS BLOB) FROM executions;

UPDATE executions SET doc = CAST(json_set(CAST(doc AS TEXT), '$.job', json('null')) AS BLOB);
