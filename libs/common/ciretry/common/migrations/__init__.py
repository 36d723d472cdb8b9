"""SQL migrations, applied in file-name order by ``ciretry migrate`` and on service start."""
