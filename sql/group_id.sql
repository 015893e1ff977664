-- A group's id and whether it is ordered (PT002 / PT003 when missing).
SELECT id, ordered FROM @ns@._group_ref($1, $2)
