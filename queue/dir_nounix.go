//go:build !unix

package queue

import "os"

// lockDir is a no-op where flock(2) does not exist: do not open one
// directory from two processes there.
func lockDir(f *os.File) error { return nil }

// renameFile renames a file the queue owns.
func renameFile(oldpath, newpath string) error { return os.Rename(oldpath, newpath) }
