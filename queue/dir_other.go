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
