package auth

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"
)

// defaultCheckInterval is how often a file-backed authenticator looks at
// its file's modification time while it is being used.
const defaultCheckInterval = 2 * time.Second

// fileStore keeps the parsed contents of one small file and reloads them
// when the file changes. It is shared by the password file and the API key
// file. The parsed value is replaced whole, never modified, so readers need
// no lock.
type fileStore[T any] struct {
	path     string
	parse    func([]byte) (T, error)
	format   func(T) ([]byte, error)
	empty    func() T
	log      *slog.Logger
	now      func() time.Time
	interval time.Duration

	cur atomic.Pointer[T]

	mu        sync.Mutex // guards the fields below and serialises reloads
	info      fs.FileInfo
	lastCheck time.Time
}

func (s *fileStore[T]) load() *T { return s.cur.Load() }

// reload reads the file and replaces the contents. A missing file is an
// empty one. On a parse error the old contents stay in place.
func (s *fileStore[T]) reload() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.reloadLocked()
}

func (s *fileStore[T]) reloadLocked() error {
	s.lastCheck = s.now()
	f, err := os.Open(s.path)
	if errors.Is(err, fs.ErrNotExist) {
		v := s.empty()
		s.cur.Store(&v)
		s.info = nil
		return nil
	}
	if err != nil {
		return err
	}
	defer f.Close()
	info, err := f.Stat()
	if err != nil {
		return err
	}
	data, err := readAllLimited(f, maxFileSize)
	if err != nil {
		return fmt.Errorf("%s: %w", s.path, err)
	}
	v, err := s.parse(data)
	if err != nil {
		return fmt.Errorf("%s: %w", s.path, err)
	}
	s.cur.Store(&v)
	s.info = info
	return nil
}

// maybeReload reloads the file when its size, modification time or inode
// changed, at most once per interval. Errors are logged and the old
// contents kept: a half-edited file must not lock everyone out.
func (s *fileStore[T]) maybeReload() {
	if s.interval < 0 {
		return
	}
	if !s.mu.TryLock() {
		return // another goroutine is checking right now
	}
	defer s.mu.Unlock()
	now := s.now()
	if now.Sub(s.lastCheck) < s.interval && s.cur.Load() != nil {
		return
	}
	s.lastCheck = now
	info, err := os.Stat(s.path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		if s.info == nil {
			return
		}
	case err != nil:
		s.log.Error("auth: cannot check file", "path", s.path, "err", err)
		return
	case s.info != nil && os.SameFile(info, s.info) && info.Size() == s.info.Size() && info.ModTime().Equal(s.info.ModTime()):
		return
	}
	if err := s.reloadLocked(); err != nil {
		s.log.Error("auth: reload failed, keeping previous contents", "path", s.path, "err", err)
		return
	}
	s.log.Info("auth: reloaded", "path", s.path)
}

// update edits the file under an exclusive lock held against other
// processes: it reads the file afresh, applies edit, writes the result to a
// temporary file in the same directory, syncs it and renames it over the
// old one, so a reader sees either the old or the new file, never a torn
// one. The new contents are in effect in s when update returns.
func (s *fileStore[T]) update(ctx context.Context, edit func(T) (T, error)) error {
	if err := os.MkdirAll(filepath.Dir(s.path), 0o700); err != nil {
		return err
	}
	unlock, err := lockFile(ctx, s.path+".lock")
	if err != nil {
		return err
	}
	defer unlock()
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.reloadLocked(); err != nil {
		return err
	}
	v, err := edit(*s.cur.Load())
	if err != nil {
		return err
	}
	data, err := s.format(v)
	if err != nil {
		return err
	}
	if err := writeFileAtomic(s.path, data, 0o600); err != nil {
		return err
	}
	return s.reloadLocked()
}

// maxFileSize bounds what a users or key file may hold (64 MiB is about
// half a million users).
const maxFileSize = 64 << 20

func readAllLimited(f *os.File, limit int64) ([]byte, error) {
	data, err := io.ReadAll(io.LimitReader(f, limit+1))
	if err != nil {
		return nil, err
	}
	if int64(len(data)) > limit {
		return nil, errors.New("file too large")
	}
	return data, nil
}

// writeFileAtomic writes data to path through a temporary file in the same
// directory that is synced and renamed over path; the directory is synced
// afterwards so the rename survives a crash.
func writeFileAtomic(path string, data []byte, perm os.FileMode) (err error) {
	dir := filepath.Dir(path)
	tmp, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp*")
	if err != nil {
		return err
	}
	defer func() {
		if err != nil {
			tmp.Close()
			os.Remove(tmp.Name())
		}
	}()
	if err = tmp.Chmod(perm); err != nil {
		return err
	}
	if _, err = tmp.Write(data); err != nil {
		return err
	}
	if err = tmp.Sync(); err != nil {
		return err
	}
	if err = tmp.Close(); err != nil {
		return err
	}
	if err = os.Rename(tmp.Name(), path); err != nil {
		return err
	}
	if d, derr := os.Open(dir); derr == nil {
		d.Sync()
		d.Close()
	}
	return nil
}
