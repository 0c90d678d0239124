//go:build linux

package queue

import (
	"io"
	"os"

	"golang.org/x/sys/unix"
)

const defaultSyncMode = syncFS

// syncFilesystem calls syncfs(2) on the file system holding f: one call
// makes every file written there durable, with its directory entries.
// Since Linux 5.8 it reports writeback errors.
func syncFilesystem(f *os.File) error {
	return unix.Syncfs(int(f.Fd()))
}

// datasync makes f's data durable without its timestamps: a journal
// segment overwritten in place then needs no file-system journal commit.
func datasync(f *os.File) error {
	return unix.Fdatasync(int(f.Fd()))
}

// preallocate reserves size bytes for f.
func preallocate(f *os.File, size int64) error {
	if err := unix.Fallocate(int(f.Fd()), 0, 0, size); err != nil {
		// Not every file system can (tmpfs before 3.5, some FUSE).
		return f.Truncate(size)
	}
	return nil
}

// writevAt writes bufs one after the other at off, in as few pwritev(2)
// calls as it takes.
func writevAt(f *os.File, bufs [][]byte, off int64) error {
	for len(bufs) > 0 {
		n, err := unix.Pwritev(int(f.Fd()), bufs, off)
		if err != nil {
			if err == unix.EINTR {
				continue
			}
			return &os.PathError{Op: "pwritev", Path: f.Name(), Err: err}
		}
		if n == 0 {
			return &os.PathError{Op: "pwritev", Path: f.Name(), Err: io.ErrShortWrite}
		}
		off += int64(n)
		for n > 0 {
			if n < len(bufs[0]) {
				bufs[0] = bufs[0][n:]
				break
			}
			n -= len(bufs[0])
			bufs = bufs[1:]
		}
	}
	return nil
}
