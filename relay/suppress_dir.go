package relay

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
)

// SuppressionDir is a durable Suppressions store: one small JSON file per
// address in a directory.
//
// Layout: the file for an address is DIR/hh/HASH.json, where HASH is the
// first 32 hex digits of the SHA-256 of SuppressionKey(addr) and hh its
// first two digits, so no directory grows past a few thousand entries and
// file names never contain address characters. Add writes a temporary
// file, fsyncs it, renames it into place and fsyncs the directory; Remove
// deletes the file and fsyncs the directory. Renames are atomic, so
// several processes may use the same directory at once: relayd's
// "suppress" subcommand lists, adds and removes entries while relayd runs,
// and relayd sees the change at its next Lookup. Nothing is cached, so
// memory use does not depend on the number of entries; a Lookup costs one
// file open.
type SuppressionDir struct {
	dir string
	cfg SuppressionConfig
}

var _ Suppressions = (*SuppressionDir)(nil)

// maxSuppressionFile bounds how much of one entry file is read.
const maxSuppressionFile = 64 << 10

// OpenSuppressionDir opens (creating it if needed) a suppression directory.
func OpenSuppressionDir(dir string, cfg SuppressionConfig) (*SuppressionDir, error) {
	if dir == "" {
		return nil, errors.New("relay: suppression directory not set")
	}
	if err := os.MkdirAll(dir, 0o750); err != nil {
		return nil, fmt.Errorf("relay: suppression directory: %w", err)
	}
	return &SuppressionDir{dir: dir, cfg: cfg.withDefaults()}, nil
}

// Dir returns the directory the store keeps its files in.
func (s *SuppressionDir) Dir() string { return s.dir }

func (s *SuppressionDir) path(addr string) (sub, file string) {
	sum := sha256.Sum256([]byte(SuppressionKey(addr)))
	h := hex.EncodeToString(sum[:16])
	sub = filepath.Join(s.dir, h[:2])
	return sub, filepath.Join(sub, h+".json")
}

func readSuppressionFile(file string) (*Suppression, error) {
	f, err := os.Open(file)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, maxSuppressionFile))
	if err != nil {
		return nil, err
	}
	var e Suppression
	if err := json.Unmarshal(data, &e); err != nil {
		return nil, fmt.Errorf("relay: suppression file %s: %w", file, err)
	}
	return &e, nil
}

// Lookup implements Suppressions.
func (s *SuppressionDir) Lookup(ctx context.Context, addr string) (*Suppression, bool, error) {
	if err := ctx.Err(); err != nil {
		return nil, false, err
	}
	_, file := s.path(addr)
	e, err := readSuppressionFile(file)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, false, nil
	}
	if err != nil {
		return nil, false, err
	}
	if SuppressionKey(e.Addr) != SuppressionKey(addr) || e.Expired(s.cfg.Now()) {
		return nil, false, nil
	}
	return e, true, nil
}

// Add implements Suppressions. The entry is durable when Add returns.
func (s *SuppressionDir) Add(ctx context.Context, e Suppression) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if err := s.cfg.prepare(&e); err != nil {
		return err
	}
	data, err := json.Marshal(e)
	if err != nil {
		return err
	}
	data = append(data, '\n')
	sub, file := s.path(e.Addr)
	if err := os.MkdirAll(sub, 0o750); err != nil {
		return err
	}
	var rnd [8]byte
	rand.Read(rnd[:])
	tmp := filepath.Join(sub, ".tmp-"+hex.EncodeToString(rnd[:]))
	if err := suppressWriteSync(tmp, data); err != nil {
		os.Remove(tmp)
		return err
	}
	if err := os.Rename(tmp, file); err != nil {
		os.Remove(tmp)
		return err
	}
	return suppressSyncDir(sub)
}

func suppressWriteSync(name string, data []byte) error {
	f, err := os.OpenFile(name, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o640)
	if err != nil {
		return err
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

func suppressSyncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	err = d.Sync()
	if cerr := d.Close(); err == nil {
		err = cerr
	}
	return err
}

// Remove implements Suppressions.
func (s *SuppressionDir) Remove(ctx context.Context, addr string) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	sub, file := s.path(addr)
	err := os.Remove(file)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	return suppressSyncDir(sub)
}

// List implements Suppressions. It reads one subdirectory listing and one
// entry at a time. Unreadable or corrupt entry files are skipped, so one
// damaged file does not hide the rest; fn sees only unexpired entries.
func (s *SuppressionDir) List(ctx context.Context, fn func(Suppression) error) error {
	return s.walk(ctx, func(file string, e *Suppression) error {
		if e.Expired(s.cfg.Now()) {
			return nil
		}
		return fn(*e)
	})
}

// Prune deletes expired entries and returns how many it deleted.
func (s *SuppressionDir) Prune(ctx context.Context) (int, error) {
	n := 0
	err := s.walk(ctx, func(file string, e *Suppression) error {
		if !e.Expired(s.cfg.Now()) {
			return nil
		}
		// Re-read just before removing, to narrow the window in which
		// another process re-adds the address.
		if again, err := readSuppressionFile(file); err != nil || !again.Expired(s.cfg.Now()) {
			return nil
		}
		if err := os.Remove(file); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return err
		}
		n++
		return nil
	})
	return n, err
}

func (s *SuppressionDir) walk(ctx context.Context, fn func(file string, e *Suppression) error) error {
	subs, err := os.ReadDir(s.dir)
	if err != nil {
		return err
	}
	for _, sd := range subs {
		if !sd.IsDir() || len(sd.Name()) != 2 {
			continue
		}
		sub := filepath.Join(s.dir, sd.Name())
		ents, err := os.ReadDir(sub)
		if err != nil {
			return err
		}
		for _, de := range ents {
			if err := ctx.Err(); err != nil {
				return err
			}
			name := de.Name()
			if de.IsDir() || !strings.HasSuffix(name, ".json") || strings.HasPrefix(name, ".") {
				continue
			}
			e, err := readSuppressionFile(filepath.Join(sub, name))
			if err != nil {
				continue
			}
			if err := fn(filepath.Join(sub, name), e); err != nil {
				return err
			}
		}
	}
	return nil
}
