package relay

import (
	"bytes"
	"context"
	"errors"
	"io"
	"os"
)

// spool holds a message that must be read twice (once to sign it, once to
// queue it): in memory up to SpoolMemory, in a temporary file beyond, so
// memory stays bounded by configuration whatever the message size.
type spool struct {
	mem  []byte
	file *os.File
}

func (r *Relay) spool(ctx context.Context, body io.Reader) (*spool, error) {
	var buf bytes.Buffer
	n, err := io.CopyN(&buf, ctxReader{ctx, body}, r.cfg.SpoolMemory+1)
	if errors.Is(err, io.EOF) {
		return &spool{mem: buf.Bytes()}, nil
	}
	if err != nil {
		return nil, err
	}
	_ = n
	f, err := os.CreateTemp(r.cfg.SpoolDir, "baton-spool-*")
	if err != nil {
		return nil, err
	}
	// Unlinked at once: the file vanishes with the process, whatever happens.
	os.Remove(f.Name())
	if _, err := f.Write(buf.Bytes()); err != nil {
		f.Close()
		return nil, err
	}
	if _, err := io.Copy(f, ctxReader{ctx, body}); err != nil {
		f.Close()
		return nil, err
	}
	return &spool{file: f}, nil
}

// Reader returns a reader from the start of the spooled message.
func (s *spool) Reader() (io.Reader, error) {
	if s.file == nil {
		return bytes.NewReader(s.mem), nil
	}
	if _, err := s.file.Seek(0, io.SeekStart); err != nil {
		return nil, err
	}
	return s.file, nil
}

func (s *spool) Close() error {
	if s.file != nil {
		return s.file.Close()
	}
	return nil
}

// ctxReader stops a copy when its context is done.
type ctxReader struct {
	ctx context.Context
	r   io.Reader
}

func (c ctxReader) Read(p []byte) (int, error) {
	if err := c.ctx.Err(); err != nil {
		return 0, err
	}
	return c.r.Read(p)
}
