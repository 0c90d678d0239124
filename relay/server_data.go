package relay

import (
	"bytes"
	"io"

	"github.com/emersion/go-smtp"
)

// wireData reads a DATA body straight from the wire's buffer, in place of
// go-smtp's reader.
//
// go-smtp un-dot-stuffs DATA one byte at a time (bufio.Reader.ReadByte and
// a state machine per byte), below which wire hands it one line per Read
// and checks each line for bare CR and LF, and go-smtp's line length limit
// looks at every byte once more. wireData does all three in one pass over
// the bytes wire has buffered: the same state machine as go-smtp's
// dataReader (so the message ends exactly where go-smtp would end it, and
// the body is exactly what go-smtp would hand the session, for any input),
// with the runs between CRs copied whole, found with bytes.IndexByte.
//
// The session's Data takes a wireData from wire.startData right after
// go-smtp answered 354, reads the message from it instead of from go-smtp's
// reader, and calls finish before it returns. finish reads what is left of
// the message (as go-smtp does after Data) and then lets go-smtp's reader,
// which has not read a byte, see an empty message (".\r\n"), so go-smtp
// carries on with the next command where the message ended.
type wireData struct {
	w     *wire
	state int
	// bare is set once a CR not followed by LF or an LF not preceded by
	// CR was read (SMTP smuggling, see bodyReader); Read then fails with
	// errBareNewline, and finish still reads to the end.
	bare bool
	// lineLen and lineMax follow go-smtp's lineLimitReader, which counts
	// the bytes of a line with the LF that started it.
	lineLen, lineMax int
	eof              bool
	err              error // a read error or smtp.ErrTooLongLine
}

// The states of go-smtp's dataReader.
const (
	drBeginLine = iota // at the start of a line
	drDot              // read "." at the start of a line
	drDotCR            // read ".\r" at the start of a line
	drCR               // read "\r", possibly at the end of a line
	drData             // in the middle of a line
)

// startData returns a wireData for the message go-smtp just accepted with
// 354, or nil when wire is not exactly at its start (the session then
// reads go-smtp's reader, as before).
func (w *wire) startData() *wireData {
	if !w.wrote || w.lastCode != "354" || len(w.out) > 0 || w.mode == modeChunk || w.readErr != nil {
		return nil
	}
	// What read does when go-smtp first reads after its 354.
	w.wrote = false
	w.mode = modeBody
	w.bare.Store(false)
	w.bodyCR = false
	// After "DATA\r\n" go-smtp's line counter stands at 1 (the LF).
	return &wireData{w: w, lineLen: 1, lineMax: w.srv.smtp.MaxLineLength}
}

// Read implements io.Reader: the message as go-smtp's reader would return
// it.
func (d *wireData) Read(p []byte) (int, error) {
	if d.bare {
		return 0, errBareNewline
	}
	n, err := d.read(p)
	if d.bare {
		return 0, errBareNewline
	}
	return n, err
}

func (d *wireData) read(p []byte) (int, error) {
	for {
		if d.err != nil {
			return 0, d.err
		}
		if d.eof {
			return 0, io.EOF
		}
		if len(p) == 0 {
			return 0, nil
		}
		buf, err := d.w.peekBody()
		if err != nil {
			d.err = err
			return 0, err
		}
		nsrc, n := d.unstuff(p, buf)
		if !d.countLines(buf[:nsrc]) {
			// go-smtp's lineLimitReader fails the read that brings the
			// long line, and the session closes the connection.
			d.err = smtp.ErrTooLongLine
			return 0, d.err
		}
		d.w.br.Discard(nsrc)
		if d.eof {
			// go-smtp's reader, which has read nothing, ends at once.
			d.w.out = append(d.w.out[:0], ".\r\n"...)
		}
		if n > 0 {
			return n, nil
		}
	}
}

// finish reads the rest of the message, if any, so that go-smtp goes on
// with the command after it. It closes the connection when that fails
// on a line longer than go-smtp allows.
func (d *wireData) finish() {
	if !d.eof && d.err == nil {
		buf := make([]byte, 4096)
		for {
			if _, err := d.read(buf); err != nil {
				break
			}
		}
	}
	if d.err == smtp.ErrTooLongLine {
		d.w.abort("500 5.5.2 " + d.w.srv.cfg.Hostname + " Line too long, closing connection")
	}
}

// peekBody returns the bytes wire has buffered, reading more from the
// connection when there are none. A failed read closes the connection
// (see bodyReadFailed).
func (w *wire) peekBody() ([]byte, error) {
	if w.br.Buffered() == 0 {
		if err := w.readErr; err != nil {
			w.readErr = nil
			return nil, w.bodyReadFailed(err)
		}
		// (bufio keeps an error that came with bytes for the next call.)
		if _, err := w.br.Peek(1); err != nil {
			return nil, w.bodyReadFailed(err)
		}
	}
	b, _ := w.br.Peek(w.br.Buffered())
	return b, nil
}

// unstuff runs go-smtp's dataReader state machine over src, writing the
// message bytes to dst, and notes bare CRs and LFs. It returns how many
// bytes of src it used and how many it wrote; it stops after the
// end-of-data line (setting eof) or when dst is full.
func (d *wireData) unstuff(dst, src []byte) (nsrc, ndst int) {
	i, n := 0, 0
	for i < len(src) && n < len(dst) {
		c := src[i]
		switch d.state {
		case drBeginLine:
			if c == '.' {
				d.state = drDot
				i++
				continue
			}
			d.state = drData
			switch c {
			case '\r':
				d.state = drCR
			case '\n':
				d.bare = true
			}
		case drDot:
			if c == '\r' {
				d.state = drDotCR
				i++
				continue
			}
			if c == '\n' {
				d.bare = true
			}
			d.state = drData
		case drDotCR:
			if c == '\n' {
				d.eof = true
				return i + 1, n
			}
			// go-smtp drops ".\r" here and reads on in the line, even
			// when c is a CR.
			d.bare = true
			d.state = drData
		case drCR:
			if c == '\n' {
				d.state = drBeginLine
			} else {
				// (A CR here does not start a new CR state in go-smtp.)
				d.bare = true
				d.state = drData
			}
		case drData:
			// The run up to and with the next CR is copied as it is.
			run := src[i:min(len(src), i+len(dst)-n)]
			j := bytes.IndexByte(run, '\r')
			if j < 0 {
				j = len(run)
			} else {
				j++
				d.state = drCR
			}
			// An LF in the run follows a byte that is not a CR (a run
			// starts after one that is not, or bare is set already).
			if !d.bare && bytes.IndexByte(run[:j], '\n') >= 0 {
				d.bare = true
			}
			n += copy(dst[n:], run[:j])
			i += j
			continue
		}
		dst[n] = c
		n++
		i++
	}
	return i, n
}

// countLines adds the bytes of b to the length of the current line as
// go-smtp's lineLimitReader counts it, and reports whether every line
// stayed within the limit.
func (d *wireData) countLines(b []byte) bool {
	if d.lineMax <= 0 {
		return true
	}
	for {
		j := bytes.IndexByte(b, '\n')
		if j < 0 {
			d.lineLen += len(b)
			return d.lineLen <= d.lineMax
		}
		if d.lineLen+j > d.lineMax {
			return false
		}
		d.lineLen = 1
		b = b[j+1:]
	}
}
