//go:build !(linux || darwin || freebsd || netbsd || openbsd)

package redisstore

import "syscall"

// peekClosed cannot check a socket on this system: the connection is taken
// as alive, and a dead one fails its next pipeline.
func peekClosed(syscall.RawConn) bool { return false }
