-- 0003: history keyed by its execution's creation order, in one B-tree.
--
-- Keyed by (execution_id, new_version), every bid's first history row went to a random
-- leaf of the key's index (execution IDs are random UUIDs): one more page in every
-- commit's WAL for each execution it touched, and most of the WAL of a busy node.
-- Keyed by the execution's `ord`, a new execution's row goes at the end and its later
-- rows next to its first. WITHOUT ROWID: the key is the table, so a row is written once.

CREATE TABLE history_by_ord (
    execution_ord  INTEGER NOT NULL REFERENCES executions (ord) ON DELETE CASCADE,
    new_version    INTEGER NOT NULL,
    previous_state TEXT    NOT NULL,
    new_state      TEXT    NOT NULL,
    cause          TEXT    NOT NULL,
    requester      TEXT    NOT NULL,
    comment        TEXT    NOT NULL,
    time_us        INTEGER NOT NULL,
    PRIMARY KEY (execution_ord, new_version)
) WITHOUT ROWID;

INSERT INTO history_by_ord (execution_ord, new_version, previous_state, new_state, cause,
    requester, comment, time_us)
SELECT e.ord, h.new_version, h.previous_state, h.new_state, h.cause, h.requester, h.comment,
    h.time_us
FROM history AS h JOIN executions AS e ON e.id = h.execution_id;

DROP TABLE history;

ALTER TABLE history_by_ord RENAME TO history;
