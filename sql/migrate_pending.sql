-- Function files ($1 names, $2 texts as rendered, in apply order) whose text differs from what
-- was last applied to the namespace, in apply order.
SELECT f.file
FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS f (file, body, i)
LEFT JOIN @ns@._pgtide_sql s ON s.file = f.file
WHERE s.checksum IS DISTINCT FROM sha256(convert_to(f.body, 'UTF8'))
ORDER BY f.i
