//go:build linux

package queue

import (
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
