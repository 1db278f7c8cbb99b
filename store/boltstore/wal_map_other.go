//go:build !linux

package boltstore

import (
	"errors"
	"os"
)

// mapSegment is not available here: segments are appended to with
// write(2).
func mapSegment(*os.File, int) ([]byte, error) {
	return nil, errors.ErrUnsupported
}

// unmapSegment is never called where mapSegment fails.
func unmapSegment([]byte) error { return errors.ErrUnsupported }
