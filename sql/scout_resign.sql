SELECT @ns@._scout_resign($1, $2)
