//go:build !linux

package logical

import "github.com/jackc/pgx/v5/pgconn"

// quiet leaves cfg as it is: quietConn is written for Linux.
func quiet(*pgconn.Config) {}
