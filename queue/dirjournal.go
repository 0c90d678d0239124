package queue

import (
	"bufio"
	"encoding/binary"
	"fmt"
	"hash/crc32"
	"io"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// The journal of a Dir.
//
// Writing a file per message costs the file system a create, a rename and
// a remove per message, and syncfs(2) then has to journal all of them: on
// the development machine a group of ten 5 KiB messages took about 3 ms
// of file operations and 0.8 ms of syncfs, where appending the same bytes
// to a preallocated file and calling fdatasync(2) took 0.2 ms. So a Dir
// writes new messages into the journal: segment files in PATH/wal/, named
// by a sequence number, that the committer appends records to and makes
// durable with one fdatasync per group commit.
//
// A message lives in the journal only (it is "journaled") until the
// first change to its state. Most messages are delivered at their first
// attempt: their journal record is all they ever cost, plus a few bytes
// of DONE record when they leave. A message that needs its state written
// (deferred, partly delivered, held or released by an operator) is first
// copied into a message file in msg/ exactly as Enqueue would have
// written it (the record holds the file image byte for byte), and from
// then on it is an ordinary Dir message. Bodies too large for a record
// (see journalMaxBody) are written as files from the start.
//
// Records are
//
//	length   4 bytes, of the payload
//	type     1 byte (jrnEnq, jrnDone) and 3 zero bytes
//	seq      8 bytes, the sequence number of the segment written to
//	crc      4 bytes, CRC-32C of the payload
//	hcrc     4 bytes, CRC-32C of the 20 bytes before it
//	payload  jrnEnq: ID length (1 byte), ID, file image;
//	         jrnDone: one or more (ID length, ID)
//
// Recovery replays the segments in sequence order and stops reading a
// segment at the first record that is not intact or carries another
// sequence number: the rest of the segment is zeros, a record torn by
// the crash (never acknowledged, since a group is acknowledged only after
// its sync, and groups are written in order), or records of the file's
// previous life as another segment (segment files are reused). An ENQ
// record makes a message journaled; a DONE record forgets it; a message
// that also has a file in msg/ (or a complete one in tmp/) is that file's
// message, which is newer.
//
// Segments are reused or removed strictly oldest first, and only when no
// journaled message, no open body reader and no group that has yet to
// sync them is left in them: a DONE record in a later segment must
// outlive the ENQ record it cancels. To keep one long-lived journaled
// message (held, or waiting behind a rate limit) from pinning every
// later segment, the keeper copies the journaled messages of the oldest
// segment into files when the journal has more than
// DirConfig.JournalSegments segments.
//
// New segment files are preallocated with zeros by the keeper ahead of
// need (spare.N), and segments that are done with are kept as the next
// spare: fdatasync of bytes overwritten in place writes the data and
// nothing else, where appending (or writing into fallocate(2)d space)
// needs a journal commit of the file system too.
const (
	jrnHdrSize = 24
	jrnEnq     = 1
	jrnDone    = 2
	// journalMaxBody is the largest body written into the journal; a
	// larger one goes to a file of its own (Enqueue reads a body of up
	// to this size into memory first, to know which).
	journalMaxBody = 256 << 10
	// defaultSegmentSize and defaultSegments are the DirConfig defaults.
	defaultSegmentSize = 16 << 20
	defaultSegments    = 8
	// minSegmentSize keeps a record of the largest allowed size (a
	// quarter of a segment) from needing most of a segment.
	minSegmentSize = 64 << 10
)

// jrnSeg is one segment file.
type jrnSeg struct {
	seq  uint64
	f    *os.File
	size int64
	// live counts the journaled messages whose ENQ record is here;
	// readers the open body readers into it; syncing the groups that
	// wrote to it and have not synced it yet. Guarded by Dir.jrn.mu.
	live, readers, syncing int
}

// jrnLoc is where a journaled message's file image lies.
type jrnLoc struct {
	seg *jrnSeg
	off int64 // of the image in the segment
	n   int64 // image length
	hdr fileHeader
}

// image reads the message's file image.
func (l *jrnLoc) image() *io.SectionReader { return io.NewSectionReader(l.seg.f, l.off, l.n) }

// jrnPos is a place in a segment.
type jrnPos struct {
	seg *jrnSeg
	off int64
}

// jrnRec is a record handed to the committer. The writer fills b (with
// room for the header) and typ; the committer fills the header, writes
// it and sets seg and off.
type jrnRec struct {
	b   []byte
	typ byte
	seg *jrnSeg
	off int64
}

// journal is the journal state of a Dir.
type journal struct {
	dir     string
	dirF    *os.File
	segSize int64
	maxSegs int

	mu sync.Mutex
	// segs are the segments in use, oldest first; the last is active
	// (appended to) once the committer has opened one.
	segs   []*jrnSeg
	active *jrnSeg
	off    int64 // next write offset in active (committer only)
	// used is off as the keeper may read it.
	used atomic.Int64
	// group holds where the current group's records start in each
	// segment it writes to (committer only), for journalFailed.
	group []jrnPos
	// retry holds the DONE records of failed groups, which nobody waits
	// for, to be written with the next group (committer only).
	retry []*commitReq
	// lazy holds the segments that groups of DONE records only wrote to
	// without a sync (committer only; see runBatch).
	lazy []*jrnSeg
	// spare is a preallocated file (spare.N) the committer takes at the
	// next roll; nil while none is ready.
	spare     *os.File
	sparePath string
	spareSize int64
	spareN    int // numbers spare files (keeper only)
	nextSeq   uint64

	kick       chan struct{} // wakes the keeper
	stop       chan struct{}
	keeperDone chan struct{}
	// zeros is the keeper's buffer for zero-filling spares.
	zeros []byte
}

// segName is the file name of segment seq.
func segName(seq uint64) string { return fmt.Sprintf("%016x.seg", seq) }

// journalOn reports whether new messages may go to the journal.
func (q *Dir) journalOn() bool { return q.jrn.dir != "" }

// scanJournal opens PATH/wal and replays its records: it returns where the
// ENQ record of each message still journaled lies, and the IDs with a
// DONE record, which are finished whatever else is on disk.
func (q *Dir) scanJournal() (live map[ID]*jrnLoc, done map[ID]bool, err error) {
	j := &q.jrn
	j.segSize = q.cfg.JournalSegmentSize
	if j.segSize == 0 {
		j.segSize = defaultSegmentSize
	}
	j.segSize = max(j.segSize, minSegmentSize)
	j.maxSegs = q.cfg.JournalSegments
	if j.maxSegs <= 0 {
		j.maxSegs = defaultSegments
	}
	j.maxSegs = max(j.maxSegs, 2)
	j.dir = filepath.Join(q.path, "wal")
	if err := os.MkdirAll(j.dir, 0o700); err != nil {
		return nil, nil, fmt.Errorf("queue: %w", err)
	}
	if j.dirF, err = os.Open(j.dir); err != nil {
		return nil, nil, fmt.Errorf("queue: %w", err)
	}
	ents, err := j.dirF.Readdirnames(-1)
	if err != nil {
		return nil, nil, fmt.Errorf("queue: %w", err)
	}
	var seqs []uint64
	for _, name := range ents {
		if s, ok := strings.CutSuffix(name, ".seg"); ok {
			if seq, err := strconv.ParseUint(s, 16, 64); err == nil && len(s) == 16 {
				seqs = append(seqs, seq)
				continue
			}
		}
		// Spares and anything else: never holds acknowledged mail.
		os.Remove(filepath.Join(j.dir, name))
	}
	sort.Slice(seqs, func(a, b int) bool { return seqs[a] < seqs[b] })
	live = make(map[ID]*jrnLoc)
	done = make(map[ID]bool)
	for _, seq := range seqs {
		f, err := os.OpenFile(filepath.Join(j.dir, segName(seq)), os.O_RDWR, 0)
		if err != nil {
			return nil, nil, fmt.Errorf("queue: %w", err)
		}
		st, err := f.Stat()
		if err != nil {
			f.Close()
			return nil, nil, fmt.Errorf("queue: %w", err)
		}
		seg := &jrnSeg{seq: seq, f: f, size: st.Size()}
		j.segs = append(j.segs, seg)
		j.nextSeq = seq + 1
		err = scanSegment(seg, func(typ byte, p []byte, off int64) error {
			switch typ {
			case jrnEnq:
				id, img, ok := cutID(p)
				if !ok || len(img) < headerSize {
					return corruptf("journal %s: bad ENQ record at %d", segName(seq), off)
				}
				h, err := parseHeader(img)
				if err != nil {
					return err
				}
				live[id] = &jrnLoc{seg: seg, off: off + int64(len(p)-len(img)), n: int64(len(img)), hdr: h}
			case jrnDone:
				for len(p) > 0 {
					id, rest, ok := cutID(p)
					if !ok {
						return corruptf("journal %s: bad DONE record at %d", segName(seq), off)
					}
					delete(live, id)
					done[id] = true
					p = rest
				}
			}
			return nil
		})
		if err != nil {
			return nil, nil, fmt.Errorf("queue: recover journal: %w", err)
		}
	}
	q.log.Info("queue: read journal", "segments", len(seqs), "journaled", len(live), "finished", len(done))
	return live, done, nil
}

// addJournaled indexes the journaled messages that have no file in msg/
// (a file is newer than the record it was copied from).
func (q *Dir) addJournaled(live map[ID]*jrnLoc, inMsg map[ID]bool) {
	for id, loc := range live {
		if inMsg[id] {
			continue
		}
		dm, err := readJournaled(id, loc)
		if err != nil {
			// The record was intact, so this is a bug or bad memory,
			// not a crash: keep the record's bytes for inspection.
			q.quarantineBytes(id, loc.image(), err)
			continue
		}
		q.mu.Lock()
		q.add(id, dm.msg, dm.held).jrn = loc
		q.mu.Unlock()
		loc.seg.live++
	}
}

// startKeeper starts the keeper goroutine, which runs until Close.
func (q *Dir) startKeeper() {
	j := &q.jrn
	j.kick = make(chan struct{}, 1)
	j.stop = make(chan struct{})
	j.keeperDone = make(chan struct{})
	go q.keeper()
	q.kickKeeper()
}

// scanSegment calls fn for each intact record of seg, in order, with the
// payload and its offset in the segment.
func scanSegment(seg *jrnSeg, fn func(typ byte, p []byte, off int64) error) error {
	r := bufio.NewReaderSize(io.NewSectionReader(seg.f, 0, seg.size), 256<<10)
	var hdr [jrnHdrSize]byte
	var p []byte
	off := int64(0)
	for {
		if _, err := io.ReadFull(r, hdr[:]); err != nil {
			return nil
		}
		l := int64(binary.LittleEndian.Uint32(hdr[0:]))
		typ := hdr[4]
		if crc32.Checksum(hdr[:20], castagnoli) != binary.LittleEndian.Uint32(hdr[20:]) ||
			binary.LittleEndian.Uint64(hdr[8:]) != seg.seq || (typ != jrnEnq && typ != jrnDone) ||
			l > seg.size-off-jrnHdrSize {
			return nil
		}
		if int64(cap(p)) < l {
			p = make([]byte, l)
		}
		p = p[:l]
		if _, err := io.ReadFull(r, p); err != nil {
			return nil
		}
		if crc32.Checksum(p, castagnoli) != binary.LittleEndian.Uint32(hdr[16:]) {
			return nil
		}
		if err := fn(typ, p, off+jrnHdrSize); err != nil {
			return err
		}
		off += jrnHdrSize + l
	}
}

// cutID splits a length-prefixed ID off the front of p.
func cutID(p []byte) (ID, []byte, bool) {
	if len(p) < 1 || len(p) < 1+int(p[0]) {
		return "", nil, false
	}
	id := ID(p[1 : 1+p[0]])
	if !validID(id) {
		return "", nil, false
	}
	return id, p[1+p[0]:], true
}

// jrnBufs holds the buffers Enqueue builds journal records in.
var jrnBufs = sync.Pool{New: func() any { b := make([]byte, 0, 64<<10); return &b }}

// journalRecord reads body into a pooled buffer laid out as an ENQ record
// (header room, ID, file header, envelope record, body). ok is false when
// the body is larger than a record may be; then buf holds what was read
// so far after bodyAt, and the caller writes a file instead.
func (q *Dir) journalRecord(id ID, envJSON []byte, body io.Reader) (bp *[]byte, bodyAt int, h fileHeader, ok bool, err error) {
	bp = jrnBufs.Get().(*[]byte)
	b := (*bp)[:0]
	b = append(b, make([]byte, jrnHdrSize)...)
	b = append(b, byte(len(id)))
	b = append(b, id...)
	img := len(b)
	b = append(b, make([]byte, headerSize)...)
	b = appendRecord(b, envJSON)
	bodyAt = len(b)
	limit := min(journalMaxBody, int(q.jrn.segSize/4)-bodyAt)
	for {
		if len(b) == cap(b) {
			b = append(b, 0)[:len(b)]
		}
		n, rerr := body.Read(b[len(b):cap(b)])
		b = b[:len(b)+n]
		if rerr == io.EOF {
			break
		}
		if rerr != nil {
			*bp = b
			return bp, bodyAt, h, false, rerr
		}
		if len(b)-bodyAt > limit {
			*bp = b
			return bp, bodyAt, h, false, nil
		}
	}
	*bp = b
	if len(b)-bodyAt > limit {
		return bp, bodyAt, h, false, nil
	}
	h = fileHeader{bodyOff: int64(bodyAt - img), bodySize: int64(len(b) - bodyAt), bodyCRC: crc32.Checksum(b[bodyAt:], castagnoli)}
	copy(b[img:], h.marshal())
	return bp, bodyAt, h, true, nil
}

// putJournalBuf returns a record buffer to the pool; huge ones are left
// to the garbage collector.
func putJournalBuf(bp *[]byte) {
	if cap(*bp) <= 2*journalMaxBody {
		*bp = (*bp)[:0]
		jrnBufs.Put(bp)
	}
}

// doneRecord builds a DONE record for id.
func doneRecord(id ID) *jrnRec {
	b := make([]byte, jrnHdrSize, jrnHdrSize+1+len(id))
	b = append(b, byte(len(id)))
	b = append(b, id...)
	return &jrnRec{b: b, typ: jrnDone}
}

// journalWrite appends the group's records to the active segment (rolling
// to a new one when a record does not fit) and returns the segments
// written to, to be synced. Called by the committer only.
func (q *Dir) journalWrite(batch []*commitReq) ([]*jrnSeg, error) {
	j := &q.jrn
	var touched []*jrnSeg
	var iov [][]byte
	start := j.off
	j.group = j.group[:0]
	flush := func() error {
		if len(iov) == 0 {
			return nil
		}
		if err := q.fault("write"); err != nil {
			return err
		}
		err := writevAt(j.active.f, iov, start)
		iov = iov[:0]
		return err
	}
	for _, r := range batch {
		rec := r.rec
		if rec == nil || r.err != nil {
			continue
		}
		n := int64(len(rec.b))
		if j.active == nil || j.off+n > j.active.size {
			if err := flush(); err != nil {
				return touched, err
			}
			if err := q.roll(); err != nil {
				return touched, err
			}
			start = j.off
		}
		if len(touched) == 0 || touched[len(touched)-1] != j.active {
			// Held until the group synced it (see syncDone): once the
			// group rolls on, the keeper could recycle it otherwise.
			j.mu.Lock()
			j.active.syncing++
			j.mu.Unlock()
			touched = append(touched, j.active)
			j.group = append(j.group, jrnPos{j.active, j.off})
		}
		h := rec.b[:jrnHdrSize]
		binary.LittleEndian.PutUint32(h[0:], uint32(n-jrnHdrSize))
		h[4], h[5], h[6], h[7] = rec.typ, 0, 0, 0
		binary.LittleEndian.PutUint64(h[8:], j.active.seq)
		binary.LittleEndian.PutUint32(h[16:], crc32.Checksum(rec.b[jrnHdrSize:], castagnoli))
		binary.LittleEndian.PutUint32(h[20:], crc32.Checksum(h[:20], castagnoli))
		rec.seg, rec.off = j.active, j.off
		if rec.typ == jrnEnq {
			// Counted now, before the segment can be rolled away from
			// and recycled; the committer uncounts a failed group.
			j.mu.Lock()
			j.active.live++
			j.mu.Unlock()
		}
		iov = append(iov, rec.b)
		j.off += n
		if len(iov) == 512 {
			if err := flush(); err != nil {
				return touched, err
			}
			start = j.off
		}
	}
	if err := flush(); err != nil {
		return touched, err
	}
	j.used.Store(j.off)
	if j.active != nil && j.off > j.active.size/2 {
		q.kickKeeper()
	}
	return touched, nil
}

// journalFailed undoes a group whose write or sync failed. Its first
// record in each segment is overwritten with zeros, so that recovery
// stops there and messages whose Enqueue failed do not come back though
// part of the group reached the disk (overwriting allocated bytes needs
// no free space; if even that fails, such a message may be delivered
// once, never lost). The counting of its ENQ records is undone, and the
// next group starts a new segment: nothing more is appended to a segment
// whose state on disk is unknown.
func (q *Dir) journalFailed(batch []*commitReq) {
	j := &q.jrn
	var zero [jrnHdrSize]byte
	for _, p := range j.group {
		if _, err := p.seg.f.WriteAt(zero[:], p.off); err != nil {
			q.log.Error("queue: cannot undo a failed journal write", "segment", segName(p.seg.seq), "err", err)
		}
	}
	j.group = j.group[:0]
	j.mu.Lock()
	for _, r := range batch {
		if r.rec != nil && r.rec.typ == jrnEnq && r.rec.seg != nil {
			r.rec.seg.live--
		}
	}
	j.mu.Unlock()
	// A finished message whose DONE record was lost would come back at
	// the next open: write it again with the next group, unless the
	// failures go on for so long that too many are waiting (then the
	// message may be delivered again, as after a crash).
	for _, r := range batch {
		if r.done == nil && r.rec != nil && r.rec.typ == jrnDone && len(j.retry) < 65536 {
			r.err, r.rec.seg = nil, nil
			j.retry = append(j.retry, r)
		}
	}
	if j.active != nil {
		j.off = j.active.size
		j.used.Store(j.off)
	}
	q.kickKeeper()
}

// roll makes a new segment the active one: the keeper's spare when one is
// ready, else a new file. The segment's name is made durable before any
// record in it is acknowledged.
func (q *Dir) roll() error {
	j := &q.jrn
	j.mu.Lock()
	f, size, from := j.spare, j.spareSize, j.sparePath
	j.spare = nil
	seq := j.nextSeq
	j.mu.Unlock()
	path := filepath.Join(j.dir, segName(seq))
	if f != nil {
		if err := renameFile(from, path); err != nil {
			f.Close()
			os.Remove(from)
			f = nil
		}
	}
	if f == nil {
		var err error
		f, err = os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
		if err != nil {
			return storageErr(err)
		}
		size = j.segSize
		if err := preallocate(f, size); err != nil {
			f.Close()
			os.Remove(path)
			return storageErr(err)
		}
	}
	if q.mode != syncNone {
		if err := j.dirF.Sync(); err != nil {
			f.Close()
			os.Remove(path)
			return err
		}
	}
	seg := &jrnSeg{seq: seq, f: f, size: size}
	j.mu.Lock()
	j.nextSeq = seq + 1
	j.segs = append(j.segs, seg)
	j.active = seg
	j.off = 0
	j.used.Store(0)
	j.mu.Unlock()
	q.kickKeeper()
	return nil
}

// syncDone releases the segments a group wrote to, once it synced them
// or failed.
func (q *Dir) syncDone(segs []*jrnSeg) {
	if len(segs) == 0 {
		return
	}
	q.jrn.mu.Lock()
	for _, s := range segs {
		s.syncing--
	}
	q.jrn.mu.Unlock()
	q.kickKeeper()
}

// lazyDelay bounds how long DONE records may wait for a sync.
const lazyDelay = 20 * time.Millisecond

// addLazy notes segments written to by a group of DONE records only, left
// unsynced; they keep the group's hold (syncing) until synced. Committer
// only.
func (q *Dir) addLazy(segs []*jrnSeg) {
	j := &q.jrn
	var held []*jrnSeg
	for _, s := range segs {
		if slices.Contains(j.lazy, s) {
			held = append(held, s) // one hold per segment is enough
			continue
		}
		j.lazy = append(j.lazy, s)
	}
	q.syncDone(held)
}

// lazySynced releases the lazy segments after a sync that covered them.
// Committer only.
func (q *Dir) lazySynced() {
	q.syncDone(q.jrn.lazy)
	q.jrn.lazy = q.jrn.lazy[:0]
}

// syncLazy syncs the lazy segments. A failure loses nothing acknowledged:
// at worst the finished messages of those DONE records are delivered
// again after a crash. Committer only.
func (q *Dir) syncLazy() {
	if len(q.jrn.lazy) == 0 {
		return
	}
	if err := q.syncJournal(q.jrn.lazy); err != nil {
		q.log.Error("queue: cannot sync journal", "err", err)
	}
	q.lazySynced()
}

// syncJournal makes the segments a group wrote to durable.
func (q *Dir) syncJournal(segs []*jrnSeg) error {
	for _, s := range segs {
		if err := q.fault("sync"); err != nil {
			return err
		}
		q.syncs.Add(1)
		if err := datasync(s.f); err != nil {
			return err
		}
	}
	return nil
}

// unjournal records that a message left the journal (loc, where it was
// journaled; nil if it was not) or the queue (gone). When it is gone a
// DONE record is queued, without waiting (see Settle), for every message,
// journaled or not: recovery removes the file of a message with a DONE
// record, which makes a file removal that a crash undid harmless.
// Callers hold the message's stripe lock, not mu.
func (q *Dir) unjournal(id ID, loc *jrnLoc, gone bool) {
	if loc != nil {
		q.jrn.mu.Lock()
		loc.seg.live--
		q.jrn.mu.Unlock()
		q.kickKeeper()
	}
	if gone && q.journalOn() {
		q.commitAsync(&commitReq{rec: doneRecord(id)})
	}
}

// copyOut writes a journaled message into its own file in msg/, durably,
// and makes it an ordinary message. Callers hold the stripe lock.
func (q *Dir) copyOut(e *dirEntry) error {
	loc := q.jrnOf(e)
	if loc == nil {
		return nil
	}
	tmp := filepath.Join(q.tmp, string(e.id))
	f, err := q.createTmp(tmp)
	if err != nil {
		return storageErr(fmt.Errorf("queue: %w", err))
	}
	committed := false
	defer func() {
		f.Close()
		if !committed {
			os.Remove(tmp)
		}
	}()
	if err := q.writeImage(f, loc); err != nil {
		return storageErr(fmt.Errorf("queue: copy out of journal: %w", err))
	}
	if err := q.commit(&commitReq{f: f, created: true}); err != nil {
		return storageErr(fmt.Errorf("queue: commit: %w", err))
	}
	if err := renameFile(tmp, q.file(e.id)); err != nil {
		return fmt.Errorf("queue: %w", err)
	}
	committed = true
	q.mu.Lock()
	e.jrn = nil
	q.mu.Unlock()
	q.unjournal(e.id, loc, false)
	return nil
}

// writeImage writes a journaled message's file image into f, a new
// message file, and (FileSync) syncs it; the caller's commit does the
// rest.
func (q *Dir) writeImage(f *os.File, loc *jrnLoc) error {
	cbuf := dirCopyBufs.Get().(*[]byte)
	_, err := io.CopyBuffer(onlyWriter{dirFile{f, q}}, loc.image(), *cbuf)
	dirCopyBufs.Put(cbuf)
	if err == nil && q.mode == syncFile {
		err = q.fsync(f)
	}
	return err
}

// kickKeeper wakes the keeper without waiting.
func (q *Dir) kickKeeper() {
	if q.jrn.kick == nil {
		return
	}
	select {
	case q.jrn.kick <- struct{}{}:
	default:
	}
}

// keeper recycles segments nothing needs any more, prepares the next
// spare, and copies messages out of the oldest segment when the journal
// grows too long.
func (q *Dir) keeper() {
	j := &q.jrn
	defer close(j.keeperDone)
	for {
		select {
		case <-j.stop:
			return
		case <-j.kick:
		}
		q.recycleSegments()
		q.prepareSpare()
		q.checkpoint()
	}
}

// recycleSegments takes the oldest segments that hold nothing live out of
// use, oldest first, keeping one file as the next spare.
func (q *Dir) recycleSegments() {
	j := &q.jrn
	for {
		j.mu.Lock()
		if s := j.segs; len(s) == 0 || s[0] == j.active || s[0].live > 0 || s[0].readers > 0 || s[0].syncing > 0 {
			j.mu.Unlock()
			return
		}
		seg := j.segs[0]
		keep := j.spare == nil
		j.mu.Unlock()
		// The DONE records in the segment stand for file removals that
		// have not been synced (Dir.discard): make them durable first.
		if err := q.syncFiles(); err != nil {
			q.log.Error("queue: cannot recycle journal segment", "segment", segName(seg.seq), "err", err)
			return
		}
		var err error
		// Not seg.f.Name(): a segment made from a spare was opened under
		// the spare's name.
		name := filepath.Join(j.dir, segName(seg.seq))
		if keep {
			j.spareN++
			spare := filepath.Join(j.dir, fmt.Sprintf("spare.%d", j.spareN))
			if err = renameFile(name, spare); err == nil {
				name = spare
			}
		}
		if !keep || err != nil {
			keep = false
			err = os.Remove(name)
		}
		if err == nil && q.mode != syncNone {
			// The segment must be gone for good before the next one
			// goes: its DONE records may cancel ENQ records here.
			err = j.dirF.Sync()
		}
		if err != nil {
			q.log.Error("queue: cannot recycle journal segment", "segment", segName(seg.seq), "err", err)
			return
		}
		j.mu.Lock()
		j.segs = j.segs[1:]
		if keep && j.spare == nil {
			j.spare, j.sparePath, j.spareSize = seg.f, name, seg.size
		} else {
			seg.f.Close()
			if keep {
				os.Remove(name)
			}
		}
		j.mu.Unlock()
	}
}

// prepareSpare zero-fills a new spare once the active segment is half
// full and no recycled one is at hand.
func (q *Dir) prepareSpare() {
	j := &q.jrn
	j.mu.Lock()
	need := j.spare == nil && j.active != nil && j.used.Load() > j.active.size/2
	j.mu.Unlock()
	if !need {
		return
	}
	j.spareN++
	path := filepath.Join(j.dir, fmt.Sprintf("spare.%d", j.spareN))
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
	if err == nil {
		err = q.zeroFill(f, j.segSize)
		if err != nil {
			f.Close()
			os.Remove(path)
		}
	}
	if err != nil {
		q.log.Warn("queue: cannot prepare journal segment", "err", err)
		return
	}
	j.mu.Lock()
	if j.spare == nil {
		j.spare, j.sparePath, j.spareSize = f, path, j.segSize
		f = nil
	}
	j.mu.Unlock()
	if f != nil {
		f.Close()
		os.Remove(path)
	}
}

// syncFiles makes every change to message files and their directories
// durable.
func (q *Dir) syncFiles() error {
	switch q.mode {
	case syncFS:
		return q.syncfs()
	case syncFile:
		return q.syncDirs()
	}
	return nil
}

// zeroFill writes size zero bytes to f and syncs it.
func (q *Dir) zeroFill(f *os.File, size int64) error {
	if q.jrn.zeros == nil {
		q.jrn.zeros = make([]byte, 1<<20)
	}
	for off := int64(0); off < size; {
		select {
		case <-q.jrn.stop:
			return ErrClosed
		default:
		}
		n := min(int64(len(q.jrn.zeros)), size-off)
		if _, err := f.WriteAt(q.jrn.zeros[:n], off); err != nil {
			return err
		}
		off += n
	}
	if q.mode == syncNone {
		return nil
	}
	return f.Sync()
}

// checkpoint copies the journaled messages of the oldest segment into
// files while the journal has more segments than allowed, so that the
// oldest can be recycled.
func (q *Dir) checkpoint() {
	j := &q.jrn
	for {
		j.mu.Lock()
		if len(j.segs) <= j.maxSegs || j.segs[0] == j.active {
			j.mu.Unlock()
			return
		}
		oldest := j.segs[0]
		j.mu.Unlock()
		q.mu.Lock()
		var ids []ID
		for id, e := range q.idx {
			if e.jrn != nil && e.jrn.seg == oldest {
				ids = append(ids, id)
			}
		}
		q.mu.Unlock()
		for len(ids) > 0 {
			select {
			case <-j.stop:
				return
			default:
			}
			n := min(len(ids), 256)
			if err := q.copyOutBatch(ids[:n]); err != nil {
				q.log.Error("queue: cannot copy messages out of the journal", "err", err)
				return
			}
			ids = ids[n:]
		}
		q.recycleSegments()
		j.mu.Lock()
		stuck := len(j.segs) > 0 && j.segs[0] == oldest
		j.mu.Unlock()
		if stuck {
			return // open readers; the next kick retries
		}
	}
}

// copyOutBatch is copyOut for many messages with one sync: the keeper
// copies the journaled messages of a segment in batches, so a backlog of
// messages not yet due costs a sync per batch, not per message. The copies
// are written under names recovery discards (tmp/ID.copy), and renamed
// into msg/ after the sync only if the message is still journaled; those
// renames are made durable before the segment is recycled (see
// recycleSegments).
func (q *Dir) copyOutBatch(ids []ID) error {
	type item struct {
		id  ID
		e   *dirEntry
		loc *jrnLoc
		tmp string
		f   *os.File
	}
	var items []item
	defer func() {
		for _, it := range items {
			if it.f != nil {
				it.f.Close()
			}
			if it.tmp != "" {
				os.Remove(it.tmp)
			}
		}
	}()
	for _, id := range ids {
		mu := q.stripe(id)
		mu.Lock()
		q.mu.Lock()
		e := q.idx[id]
		var loc *jrnLoc
		if e != nil {
			loc = e.jrn
		}
		q.mu.Unlock()
		var err error
		if loc != nil {
			it := item{id: id, e: e, loc: loc, tmp: filepath.Join(q.tmp, string(id)+".copy")}
			it.f, err = os.OpenFile(it.tmp, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
			if err == nil {
				items = append(items, it)
				err = q.writeImage(it.f, loc)
			}
		}
		mu.Unlock()
		if err != nil {
			return storageErr(err)
		}
	}
	if len(items) == 0 {
		return nil
	}
	// syncfs, or (FileSync) the tmp directory after the files' fsyncs.
	if err := q.commit(&commitReq{f: items[0].f, created: true}); err != nil {
		return storageErr(err)
	}
	for i := range items {
		it := &items[i]
		mu := q.stripe(it.id)
		mu.Lock()
		q.mu.Lock()
		still := q.idx[it.id] == it.e && it.e.jrn == it.loc
		q.mu.Unlock()
		if still {
			if err := renameFile(it.tmp, q.file(it.id)); err != nil {
				mu.Unlock()
				return err
			}
			it.tmp = ""
			q.mu.Lock()
			it.e.jrn = nil
			q.mu.Unlock()
			q.unjournal(it.id, it.loc, false)
		}
		mu.Unlock()
	}
	return nil
}

// stopKeeper stops the keeper. The committer must be stopped after it
// (the keeper commits), and the segments closed after that.
func (q *Dir) stopKeeper() {
	if q.jrn.stop == nil {
		return
	}
	close(q.jrn.stop)
	<-q.jrn.keeperDone
}

// closeSegments closes the journal's files.
func (q *Dir) closeSegments() {
	j := &q.jrn
	j.mu.Lock()
	defer j.mu.Unlock()
	for _, s := range j.segs {
		s.f.Close()
	}
	if j.spare != nil {
		// A zero-filled spare is worth keeping only within a run.
		j.spare.Close()
		os.Remove(j.sparePath)
		j.spare = nil
	}
	if j.dirF != nil {
		j.dirF.Close()
	}
}

// journalReader opens the body of a journaled message. Callers hold the
// stripe lock.
func (q *Dir) journalReader(id ID, loc *jrnLoc) *bodyReader {
	q.jrn.mu.Lock()
	loc.seg.readers++
	q.jrn.mu.Unlock()
	seg := loc.seg
	return &bodyReader{
		r:    io.NewSectionReader(seg.f, loc.off+loc.hdr.bodyOff, loc.hdr.bodySize),
		crc:  newCRC(),
		want: loc.hdr.bodyCRC,
		id:   id,
		done: func() {
			q.jrn.mu.Lock()
			seg.readers--
			q.jrn.mu.Unlock()
			q.kickKeeper()
		},
	}
}

// readJournaled reads a journaled message's envelope from its record.
func readJournaled(id ID, loc *jrnLoc) (*diskMessage, error) {
	return readMessageAt(loc.image(), loc.n, id)
}

// quarantineBytes saves a damaged journal record as a quarantined file.
func (q *Dir) quarantineBytes(id ID, r io.Reader, cause error) {
	dst := filepath.Join(q.quar, string(id))
	if _, err := os.Lstat(dst); err == nil {
		dst = fmt.Sprintf("%s.journal", dst)
	}
	f, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err == nil {
		_, err = io.Copy(f, r)
		f.Close()
	}
	if err != nil {
		q.log.Error("queue: cannot quarantine damaged journal record", "id", id, "err", err, "cause", cause)
		return
	}
	q.mu.Lock()
	q.nquar++
	q.mu.Unlock()
	q.log.Error("queue: quarantined damaged journal record", "id", id, "to", dst, "err", cause)
}
