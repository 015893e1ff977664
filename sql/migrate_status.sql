-- Whether the namespace is current: the $1 migrations applied, and every function file ($2 names,
-- $3 texts as rendered) applied with its present text. Needs both bookkeeping tables.
SELECT (SELECT count(*) FROM @ns@._sqlx_migrations WHERE success AND version <= $1) = $1
   AND (SELECT count(*)
        FROM unnest($2::text[], $3::text[]) AS f (file, body)
        JOIN @ns@._pgtide_sql s ON s.file = f.file AND s.checksum = sha256(convert_to(f.body, 'UTF8')))
       = cardinality($2::text[])
