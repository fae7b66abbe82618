"""Operations: log lines and metrics an admin can use."""
