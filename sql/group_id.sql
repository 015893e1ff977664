-- A group's id (PT002 / PT003 when missing).
SELECT id FROM @ns@._group_ref($1, $2)
