package queue

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"hash"
	"hash/crc32"
	"io"
	"os"
	"time"
)

// On-disk format of one message file in a Dir queue (all integers little
// endian):
//
//	header   32 bytes: magic "BATONQ\x00\x01", body offset (8), body
//	         size (8), CRC-32C of the body (4), CRC-32C of the 28
//	         bytes before it (4)
//	envelope one record (see below) holding envRecord as JSON
//	body     the message, byte for byte
//	state    zero or more records holding stateRecord as JSON, appended
//	         by Settle and the Admin operations; replayed in order
//
// A record is a 4-byte payload length, a 4-byte CRC-32C of the payload and
// the payload. The header is written last, just before the file is synced,
// and a file only enters the msg directory after it was synced, so a file
// there with a bad header, envelope or body length is corruption, not a
// crash. A torn last state record (a crash during an append that was never
// acknowledged) is cut off on the next open.
const (
	fileMagic  = "BATONQ\x00\x01"
	headerSize = 32
	recHdrSize = 8
	// maxRecord bounds one record so that a corrupt length cannot make
	// the reader allocate gigabytes.
	maxRecord = 16 << 20
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

func newCRC() hash.Hash32 { return crc32.New(castagnoli) }

// errCorrupt marks a message file that cannot be read back; such files are
// quarantined.
var errCorrupt = errors.New("queue: corrupt message file")

func corruptf(format string, a ...any) error {
	return fmt.Errorf("%w: "+format, append([]any{errCorrupt}, a...)...)
}

type fileHeader struct {
	bodyOff  int64
	bodySize int64
	bodyCRC  uint32
}

func (h fileHeader) marshal() []byte {
	b := make([]byte, headerSize)
	copy(b, fileMagic)
	binary.LittleEndian.PutUint64(b[8:], uint64(h.bodyOff))
	binary.LittleEndian.PutUint64(b[16:], uint64(h.bodySize))
	binary.LittleEndian.PutUint32(b[24:], h.bodyCRC)
	binary.LittleEndian.PutUint32(b[28:], crc32.Checksum(b[:28], castagnoli))
	return b
}

func parseHeader(b []byte) (fileHeader, error) {
	if len(b) < headerSize {
		return fileHeader{}, corruptf("short header")
	}
	if string(b[:8]) != fileMagic {
		return fileHeader{}, corruptf("bad magic")
	}
	if crc32.Checksum(b[:28], castagnoli) != binary.LittleEndian.Uint32(b[28:]) {
		return fileHeader{}, corruptf("header checksum mismatch")
	}
	h := fileHeader{
		bodyOff:  int64(binary.LittleEndian.Uint64(b[8:])),
		bodySize: int64(binary.LittleEndian.Uint64(b[16:])),
		bodyCRC:  binary.LittleEndian.Uint32(b[24:]),
	}
	if h.bodyOff < headerSize+recHdrSize || h.bodySize < 0 || h.bodyOff > maxRecord+headerSize+recHdrSize {
		return fileHeader{}, corruptf("bad body offset or size")
	}
	return h, nil
}

func appendRecord(dst, payload []byte) []byte {
	var h [recHdrSize]byte
	binary.LittleEndian.PutUint32(h[:], uint32(len(payload)))
	binary.LittleEndian.PutUint32(h[4:], crc32.Checksum(payload, castagnoli))
	return append(append(dst, h[:]...), payload...)
}

// nextRecord parses the record at the start of b. It returns the payload
// and the record's total length, or ok false when b does not start with a
// whole, intact record.
func nextRecord(b []byte) (payload []byte, n int, ok bool) {
	if len(b) < recHdrSize {
		return nil, 0, false
	}
	l := int(binary.LittleEndian.Uint32(b))
	if l > maxRecord || len(b)-recHdrSize < l {
		return nil, 0, false
	}
	p := b[recHdrSize : recHdrSize+l]
	if crc32.Checksum(p, castagnoli) != binary.LittleEndian.Uint32(b[4:]) {
		return nil, 0, false
	}
	return p, recHdrSize + l, true
}

// envRecord is the first record of a message file.
type envRecord struct {
	V        int       `json:"v"`
	Envelope Envelope  `json:"env"`
	Received time.Time `json:"received"`
	Expires  time.Time `json:"expires"`
}

// stateRecord is one change to a message, appended to its file.
type stateRecord struct {
	// Held, when set, changes the hold state.
	Held *bool `json:"held,omitempty"`
	// Rcpts lists the recipients that changed.
	Rcpts []rcptRecord `json:"r,omitempty"`
}

// rcptRecord is the new state of one recipient; Add holds the attempts to
// append to its history.
type rcptRecord struct {
	I        int       `json:"i"`
	State    RcptState `json:"s"`
	Attempts int       `json:"n,omitempty"`
	Next     time.Time `json:"next"`
	Last     Reply     `json:"last,omitzero"`
	Expired  bool      `json:"exp,omitempty"`
	Add      []Attempt `json:"add,omitempty"`
}

// diffState returns the record that turns old into m, or nil when nothing
// changed. Both must be snapshots of the same message.
func diffState(old, m *Message, oldHeld, held bool) *stateRecord {
	rec := &stateRecord{}
	if oldHeld != held {
		rec.Held = &held
	}
	for i := range m.Recipients {
		o, n := &old.Recipients[i], &m.Recipients[i]
		if o.State == n.State && o.Attempts == n.Attempts && o.NextAttempt.Equal(n.NextAttempt) && o.Last == n.Last && o.Expired == n.Expired {
			continue
		}
		r := rcptRecord{I: i, State: n.State, Attempts: n.Attempts, Next: n.NextAttempt, Last: n.Last, Expired: n.Expired}
		if added := n.Attempts - o.Attempts; added > 0 {
			r.Add = n.History[max(0, len(n.History)-added):]
		}
		rec.Rcpts = append(rec.Rcpts, r)
	}
	if rec.Held == nil && len(rec.Rcpts) == 0 {
		return nil
	}
	return rec
}

// apply replays a record into m and returns the new hold state.
func (rec *stateRecord) apply(m *Message, held bool) (bool, error) {
	if rec.Held != nil {
		held = *rec.Held
	}
	for _, r := range rec.Rcpts {
		if r.I < 0 || r.I >= len(m.Recipients) {
			return held, corruptf("recipient index %d out of range", r.I)
		}
		s := &m.Recipients[r.I]
		s.State, s.Attempts, s.NextAttempt, s.Last, s.Expired = r.State, r.Attempts, r.Next, r.Last, r.Expired
		s.History = append(s.History, r.Add...)
		if n := len(s.History); n > MaxHistory {
			s.History = append(s.History[:0:0], s.History[n-MaxHistory:]...)
		}
	}
	return held, nil
}

// diskMessage is a message read back from its file.
type diskMessage struct {
	msg  *Message
	held bool
	hdr  fileHeader
	// end is where the last intact record ends; size is the file size.
	// end < size means a torn tail.
	end, size int64
}

// readMessage reads the envelope and state of a message file (not the
// body). Errors wrapping errCorrupt mean the file is damaged.
func readMessage(f *os.File, id ID) (*diskMessage, error) {
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	return readMessageAt(f, st.Size(), id)
}

// readMessageAt is readMessage for the size bytes of a message file in f:
// a file, or a file image in a journal record.
func readMessageAt(f io.ReaderAt, size int64, id ID) (*diskMessage, error) {
	buf := make([]byte, min(size, 4096))
	if n, err := f.ReadAt(buf, 0); n < len(buf) {
		if err == nil || err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		return nil, err
	}
	hdr, err := parseHeader(buf)
	if err != nil {
		return nil, err
	}
	if hdr.bodyOff+hdr.bodySize > size {
		return nil, corruptf("truncated: body ends at %d, file has %d bytes", hdr.bodyOff+hdr.bodySize, size)
	}
	if int64(len(buf)) < hdr.bodyOff {
		more := make([]byte, hdr.bodyOff)
		copy(more, buf)
		if _, err := f.ReadAt(more[len(buf):], int64(len(buf))); err != nil {
			return nil, err
		}
		buf = more
	}
	p, n, ok := nextRecord(buf[headerSize:hdr.bodyOff])
	if !ok || int64(headerSize+n) != hdr.bodyOff {
		return nil, corruptf("bad envelope record")
	}
	var er envRecord
	if err := json.Unmarshal(p, &er); err != nil {
		return nil, corruptf("envelope: %v", err)
	}
	if len(er.Envelope.To) == 0 {
		return nil, corruptf("envelope without recipients")
	}
	m := &Message{ID: id, Envelope: er.Envelope, Received: er.Received, Expires: er.Expires, Size: hdr.bodySize}
	m.Recipients = make([]RecipientStatus, len(er.Envelope.To))
	for i, r := range er.Envelope.To {
		m.Recipients[i] = RecipientStatus{Recipient: r, NextAttempt: er.Received}
	}
	dm := &diskMessage{msg: m, held: er.Envelope.Held, hdr: hdr, size: size}
	start := hdr.bodyOff + hdr.bodySize
	tail := make([]byte, size-start)
	if len(tail) > 0 {
		if _, err := f.ReadAt(tail, start); err != nil && err != io.EOF {
			return nil, err
		}
	}
	off := 0
	for off < len(tail) {
		p, n, ok := nextRecord(tail[off:])
		if !ok {
			break
		}
		var rec stateRecord
		if err := json.Unmarshal(p, &rec); err != nil {
			return nil, corruptf("state record: %v", err)
		}
		if dm.held, err = rec.apply(m, dm.held); err != nil {
			return nil, err
		}
		off += n
	}
	dm.end = start + int64(off)
	m.State = StateQueued
	for _, r := range m.Recipients {
		if r.Attempts > 0 {
			m.State = StateDeferred
			break
		}
	}
	if dm.held {
		m.State = StateHeld
	}
	return dm, nil
}

// bodyReader streams a body and checks its CRC at the end.
type bodyReader struct {
	f    *os.File
	r    *io.SectionReader
	crc  hash.Hash32
	want uint32
	id   ID
	done func() // called once by Close
}

func (b *bodyReader) Read(p []byte) (int, error) {
	n, err := b.r.Read(p)
	b.crc.Write(p[:n])
	if err == io.EOF && b.crc.Sum32() != b.want {
		return n, corruptf("message %s: body checksum mismatch", b.id)
	}
	return n, err
}

func (b *bodyReader) Close() error {
	if b.done != nil {
		b.done()
		b.done = nil
	}
	if b.f == nil {
		return nil // a journal segment, which the Dir closes
	}
	return b.f.Close()
}
