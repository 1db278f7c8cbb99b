//go:build linux || darwin || freebsd || netbsd || openbsd

package redisstore

import "syscall"

// peekClosed reports whether the socket behind raw was closed by its peer
// or holds unread data, without blocking or consuming anything.
func peekClosed(raw syscall.RawConn) bool {
	closed := false
	err := raw.Read(func(fd uintptr) bool {
		var b [1]byte
		n, _, err := syscall.Recvfrom(int(fd), b[:], syscall.MSG_PEEK|syscall.MSG_DONTWAIT)
		closed = n > 0 || (n == 0 && err == nil) || (err != nil && err != syscall.EAGAIN && err != syscall.EWOULDBLOCK)
		return true
	})
	return err != nil || closed
}
