//go:build linux

package boltstore

import (
	"os"
	"syscall"
)

// mapSegment reserves size bytes of disk for the segment file f
// (fallocate, so writing into the mapping never finds the disk full) and
// maps them into memory, shared with the file.
func mapSegment(f *os.File, size int) ([]byte, error) {
	if err := syscall.Fallocate(int(f.Fd()), 0, 0, int64(size)); err != nil {
		return nil, err
	}
	return syscall.Mmap(int(f.Fd()), 0, size, syscall.PROT_READ|syscall.PROT_WRITE, syscall.MAP_SHARED)
}

// unmapSegment releases a mapping made by mapSegment.
func unmapSegment(mem []byte) error { return syscall.Munmap(mem) }
