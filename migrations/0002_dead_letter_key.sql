-- Dead letters get a natural key, so a record seen twice (a backfill overlapping what was
-- already stored, a spool replayed after a crash) is stored once: the thing, when it happened
-- (`created` as sent, or the arrival time in ms for a line that had none) and the payload.
ALTER TABLE dead_letters ADD COLUMN IF NOT EXISTS letter_at text;
UPDATE dead_letters
   SET letter_at = coalesce(created, ((extract(epoch FROM received_at) * 1000)::bigint)::text)
 WHERE letter_at IS NULL;
-- Repeats stored before this migration: keep the first.
DELETE FROM dead_letters d
 USING dead_letters e
 WHERE coalesce(d.thing, '') = coalesce(e.thing, '')
   AND d.letter_at = e.letter_at
   AND md5(d.payload) = md5(e.payload)
   AND d.id > e.id;
ALTER TABLE dead_letters ALTER COLUMN letter_at SET NOT NULL;
CREATE UNIQUE INDEX IF NOT EXISTS dead_letters_natural_key
    ON dead_letters (coalesce(thing, ''), letter_at, md5(payload));
