SELECT due_streams, next_due, checked_at FROM @ns@._scout_due($1)
