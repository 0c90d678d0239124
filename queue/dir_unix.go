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
