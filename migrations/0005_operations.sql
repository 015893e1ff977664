-- pgtide operations: functions behind the CLI's group reset, trim, grant and health commands.
SELECT 1;
