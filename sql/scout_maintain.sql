-- The scout's maintenance pass, fenced: runs only while holder $1 still has term $2.
SELECT * FROM @ns@.maintain()
WHERE EXISTS (SELECT 1 FROM @ns@.scout_lease WHERE holder = $1 AND term = $2 AND expires_at > now())
