package queueadmin

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"time"

	"github.com/batonmail/baton/queue"
)

// Client calls a Serve socket. It implements queue.Admin and Quarantiner.
type Client struct {
	hc *http.Client
}

var (
	_ queue.Admin = (*Client)(nil)
	_ Quarantiner = (*Client)(nil)
)

// Dial connects to the admin socket at path and checks that a server
// answers. The error matches ErrNoServer when nothing listens there.
func Dial(ctx context.Context, path string) (*Client, error) {
	var d net.Dialer
	c := &Client{hc: &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return d.DialContext(ctx, "unix", path)
		},
	}}}
	cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if _, err := c.Stats(cctx); err != nil {
		var ne *net.OpError
		if errors.As(err, &ne) {
			return nil, fmt.Errorf("%w: %v", ErrNoServer, err)
		}
		return nil, err
	}
	return c, nil
}

// ErrNoServer means no relayd answers on the admin socket.
var ErrNoServer = errors.New("queueadmin: no server on the admin socket")

// Close releases idle connections.
func (c *Client) Close() error {
	c.hc.CloseIdleConnections()
	return nil
}

func filterQuery(f queue.Filter) url.Values {
	v := url.Values{}
	set := func(k, s string) {
		if s != "" {
			v.Set(k, s)
		}
	}
	set("id", string(f.ID))
	set("domain", f.Domain)
	set("sender", f.Sender)
	if f.Null {
		v.Set("null", "1")
	}
	if f.State != 0 {
		v.Set("state", f.State.String())
	}
	if !f.ReceivedBefore.IsZero() {
		v.Set("before", f.ReceivedBefore.Format(time.RFC3339Nano))
	}
	return v
}

func (c *Client) do(ctx context.Context, method, path string, q url.Values) (*http.Response, error) {
	u := "http://relayd" + path
	if len(q) > 0 {
		u += "?" + q.Encode()
	}
	req, err := http.NewRequestWithContext(ctx, method, u, nil)
	if err != nil {
		return nil, err
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		return nil, err
	}
	if resp.StatusCode/100 != 2 {
		defer resp.Body.Close()
		return nil, decodeError(resp)
	}
	return resp, nil
}

func decodeError(resp *http.Response) error {
	var eb errorBody
	if err := json.NewDecoder(io.LimitReader(resp.Body, 1<<20)).Decode(&eb); err != nil {
		return fmt.Errorf("queueadmin: server said %s", resp.Status)
	}
	for _, k := range kinds {
		if eb.Kind == k.kind {
			return fmt.Errorf("%w (%s)", k.err, eb.Error)
		}
	}
	return errors.New(eb.Error)
}

func (c *Client) call(ctx context.Context, method, path string, q url.Values, out any) error {
	resp, err := c.do(ctx, method, path, q)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if out == nil {
		io.Copy(io.Discard, resp.Body)
		return nil
	}
	return json.NewDecoder(resp.Body).Decode(out)
}

func idQuery(id queue.ID) url.Values { return url.Values{"id": {string(id)}} }

// Get implements queue.Admin.
func (c *Client) Get(ctx context.Context, id queue.ID) (*queue.Message, error) {
	var m queue.Message
	if err := c.call(ctx, "GET", "/v1/get", idQuery(id), &m); err != nil {
		return nil, err
	}
	return &m, nil
}

// List implements queue.Admin; messages are decoded one at a time from
// the stream.
func (c *Client) List(ctx context.Context, f queue.Filter, fn func(*queue.Message) error) error {
	resp, err := c.do(ctx, "GET", "/v1/list", filterQuery(f))
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 16<<20)
	for sc.Scan() {
		line := sc.Bytes()
		var probe struct {
			Error string `json:"error"`
		}
		if json.Unmarshal(line, &probe) == nil && probe.Error != "" {
			return errors.New(probe.Error)
		}
		var m queue.Message
		if err := json.Unmarshal(line, &m); err != nil {
			return fmt.Errorf("queueadmin: bad list line: %w", err)
		}
		if err := fn(&m); err != nil {
			return err
		}
	}
	return sc.Err()
}

// Hold implements queue.Admin.
func (c *Client) Hold(ctx context.Context, id queue.ID) error {
	return c.call(ctx, "POST", "/v1/hold", idQuery(id), nil)
}

// Release implements queue.Admin.
func (c *Client) Release(ctx context.Context, id queue.ID) error {
	return c.call(ctx, "POST", "/v1/release", idQuery(id), nil)
}

// Delete implements queue.Admin.
func (c *Client) Delete(ctx context.Context, id queue.ID) error {
	return c.call(ctx, "POST", "/v1/delete", idQuery(id), nil)
}

// Retry implements queue.Admin.
func (c *Client) Retry(ctx context.Context, f queue.Filter) (int, error) {
	var out struct {
		Count int `json:"count"`
	}
	err := c.call(ctx, "POST", "/v1/retry", filterQuery(f), &out)
	return out.Count, err
}

// Stats implements queue.Admin.
func (c *Client) Stats(ctx context.Context) (*queue.Stats, error) {
	var s queue.Stats
	if err := c.call(ctx, "GET", "/v1/stats", nil, &s); err != nil {
		return nil, err
	}
	return &s, nil
}

// Quarantined implements Quarantiner.
func (c *Client) Quarantined(ctx context.Context) ([]queue.QuarantinedFile, error) {
	var out []queue.QuarantinedFile
	err := c.call(ctx, "GET", "/v1/quarantine", nil, &out)
	return out, err
}
