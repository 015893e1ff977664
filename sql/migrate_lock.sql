-- The namespace's migration lock (session level, released when the migrating connection ends).
SELECT pg_advisory_lock(hashtext('pgtide.migrate.' || @ns_lit@))
