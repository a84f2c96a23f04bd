-- 0007: the live and terminal indexes on `ended_us`, which only the ending move writes.
--
-- Their WHERE read `state` and `executions_terminal` held `update_us`, which every update
-- sets: SQLite rewrote both indexes' entries on every update of an execution, half the
-- cost of the UPDATE (~7 of ~14 µs, 6 updates per noop job). `ended_us` is NULL while
-- the execution lives and is set once, to the update time of the move that ends it (a
-- terminal execution is never updated again), so only that move writes these indexes.

ALTER TABLE executions ADD COLUMN ended_us INTEGER;

UPDATE executions SET ended_us = update_us WHERE state IN ('Completed', 'Failed', 'Cancelled');

DROP INDEX executions_live;

DROP INDEX executions_terminal;

-- live_executions (start-up restore, timers), in creation order. Queries repeat this
-- WHERE word for word (sqlite_rows.LIVE) so the planner can use it.
CREATE INDEX executions_live ON executions (ord) WHERE ended_us IS NULL;

-- purge: terminal executions by age (sqlite_rows.TERMINAL).
CREATE INDEX executions_terminal ON executions (ended_us, id) WHERE ended_us IS NOT NULL;
