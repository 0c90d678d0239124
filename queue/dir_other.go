//go:build !linux

package queue

import (
	"errors"
	"os"
)

const defaultSyncMode = syncFile

func syncFilesystem(f *os.File) error {
	return errors.New("queue: syncfs is only available on Linux")
}

func datasync(f *os.File) error { return f.Sync() }

func preallocate(f *os.File, size int64) error { return f.Truncate(size) }

func writevAt(f *os.File, bufs [][]byte, off int64) error {
	for _, b := range bufs {
		if _, err := f.WriteAt(b, off); err != nil {
			return err
		}
		off += int64(len(b))
	}
	return nil
}
