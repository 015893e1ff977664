-- After migrate() applied anything: no function executable by PUBLIC, and every role granted
-- through grant_runtime holds exactly what this release's functions need.
SELECT @ns@._regrant()
