-- The registrar takes registrations back: $1 stream names (NULL: all of them), $2 this
-- process's holder id. Returns how many went.
SELECT @ns@._wake_release($1, $2)
