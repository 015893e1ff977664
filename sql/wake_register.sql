-- The registrar's registration (sql/functions/wakeups.sql, `_wake_register`): $1 stream, $2 this
-- process's holder id, $3 its LISTEN session's backend pid, $4 the longest wait for publishing
-- transactions in microseconds. true: in force; false: wait again later; NULL: no such stream.
SELECT @ns@._wake_register($1, $2, $3, $4::int8 * interval '1 microsecond')
