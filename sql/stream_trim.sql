-- $1 stream, $2 max age in microseconds, $3 max length (either may be NULL).
SELECT @ns@.trim_stream($1, $2::int8 * interval '1 microsecond', $3)
