//go:build unix

package queue

import (
	"errors"
	"os"
	"syscall"
)

// lockDir takes an exclusive flock(2) on f without waiting.
func lockDir(f *os.File) error {
	err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
	if errors.Is(err, syscall.EWOULDBLOCK) || errors.Is(err, syscall.EAGAIN) {
		return ErrLocked
	}
	return err
}

// renameFile renames a file the queue owns. os.Rename first lstat(2)s
// newpath to refuse replacing a directory; the queue's paths are never
// directories, and three renames per message made that lookup a cost of
// its own.
func renameFile(oldpath, newpath string) error {
	if err := syscall.Rename(oldpath, newpath); err != nil {
		return &os.LinkError{Op: "rename", Old: oldpath, New: newpath, Err: err}
	}
	return nil
}
