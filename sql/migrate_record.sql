-- Records that function file $1 was applied with text $2.
INSERT INTO @ns@._pgtide_sql (file, checksum) VALUES ($1, sha256(convert_to($2, 'UTF8')))
ON CONFLICT (file) DO UPDATE SET checksum = excluded.checksum, applied_at = now()
