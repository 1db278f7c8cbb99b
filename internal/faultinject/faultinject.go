// Package faultinject lets tests make the embedded store's disk writes
// fail (a full disk, an I/O error) where they cannot fill a real
// filesystem. Nothing sets it outside tests; unset, it costs one atomic
// load per write-ahead log append.
package faultinject

import "sync/atomic"

var diskWrite atomic.Pointer[func() error]

// SetDiskWrite makes every write-ahead log append of the embedded store
// call f first and fail with its error, if any, as if the disk had
// refused the write without taking any of it. nil removes the fault.
func SetDiskWrite(f func() error) {
	if f == nil {
		diskWrite.Store(nil)
		return
	}
	diskWrite.Store(&f)
}

// DiskWrite returns the error the next write-ahead log append must fail
// with, or nil.
func DiskWrite() error {
	if f := diskWrite.Load(); f != nil {
		return (*f)()
	}
	return nil
}
