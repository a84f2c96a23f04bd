-- 0002: the trace context a callback's span links to (the ask's, when it differs from
-- the BidAccepted context the callback continues). Not published: kept for the span.
ALTER TABLE outbox ADD COLUMN link TEXT NOT NULL DEFAULT '{}';
