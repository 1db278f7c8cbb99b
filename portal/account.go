package portal

import (
	"encoding/json"
	"errors"
	"net/http"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/apimonetize/caddy-api-monetize/store"
)

// sessionView is a row of the member's sessions list. It holds no secret:
// Public is a random id of its own, not the cookie or its hash.
type sessionView struct {
	Public, Remote, Agent string
	Created, LastSeen     time.Time
	Current               bool
}

// memberSessions lists the member's live sessions, the newest use first.
// A last-seen record whose session has ended (a refresh racing the end)
// is dropped.
func (h *Handler) memberSessions(r *http.Request, s *session) ([]sessionView, error) {
	ctx := r.Context()
	recs, err := h.be.Records(ctx)
	if err != nil {
		return nil, err
	}
	all, err := recs.ListRecords(ctx, recordKindSeen, s.Email+"/")
	if err != nil {
		return nil, err
	}
	now := h.now()
	var out []sessionView
	for _, rec := range all {
		var v seen
		if json.Unmarshal(rec.Data, &v) != nil || v.Email != s.Email || now.Sub(v.LastSeen) >= h.cfg.SessionIdleTimeout {
			continue
		}
		if _, err := recs.GetRecord(ctx, recordKindSession, v.Session); errors.Is(err, store.ErrNotFound) {
			_ = recs.DeleteRecord(ctx, recordKindSeen, rec.ID)
			continue
		} else if err != nil {
			return nil, err
		}
		out = append(out, sessionView{Public: strings.TrimPrefix(rec.ID, s.Email+"/"), Remote: v.Remote, Agent: v.Agent,
			Created: v.Created, LastSeen: v.LastSeen, Current: v.Session == s.id})
	}
	sort.SliceStable(out, func(i, j int) bool {
		if out[i].Current != out[j].Current {
			return out[i].Current
		}
		return out[i].LastSeen.After(out[j].LastSeen)
	})
	return out, nil
}

func (h *Handler) accountPage(w http.ResponseWriter, r *http.Request, s *session) {
	h.showAccount(w, r, s, http.StatusOK, nil)
}

func (h *Handler) showAccount(w http.ResponseWriter, r *http.Request, s *session, status int, extra map[string]any) {
	list, err := h.memberSessions(r, s)
	if err != nil {
		h.failErr(w, r, s, err)
		return
	}
	data := map[string]any{"Sessions": list, "Idle": humanDuration(h.cfg.SessionIdleTimeout), "Role": s.role}
	for k, v := range extra {
		data[k] = v
	}
	h.render(w, r, status, "account", s, data)
}

// endOtherSessions signs the member out everywhere but here.
func (h *Handler) endOtherSessions(w http.ResponseWriter, r *http.Request, s *session) {
	list, err := h.memberSessions(r, s)
	if err != nil {
		h.failErr(w, r, s, err)
		return
	}
	n := 0
	for _, v := range list {
		if v.Current {
			continue
		}
		if err := h.endPublic(r, s, v.Public); err != nil {
			h.failErr(w, r, s, err)
			return
		}
		n++
	}
	h.showAccount(w, r, s, http.StatusOK, map[string]any{"Ended": n})
}

// endOneSession ends one of the member's sessions (the current one signs
// out). Only the member's own sessions can be named: the id is looked up
// under the member's address.
func (h *Handler) endOneSession(w http.ResponseWriter, r *http.Request, s *session) {
	public := r.PathValue("id")
	recs, err := h.be.Records(r.Context())
	if err != nil {
		h.failErr(w, r, s, err)
		return
	}
	rec, err := recs.GetRecord(r.Context(), recordKindSeen, seenID(s.Email, public))
	var v seen
	if err == nil && (json.Unmarshal(rec.Data, &v) != nil || v.Email != s.Email) {
		err = store.ErrNotFound
	}
	if errors.Is(err, store.ErrNotFound) || strings.Contains(public, "/") {
		h.fail(w, r, s, http.StatusNotFound, "There is no such session.")
		return
	}
	if err != nil {
		h.failErr(w, r, s, err)
		return
	}
	if v.Session == s.id {
		h.signout(w, r, s)
		return
	}
	if err := h.endPublic(r, s, public); err != nil {
		h.failErr(w, r, s, err)
		return
	}
	h.showAccount(w, r, s, http.StatusOK, map[string]any{"Ended": 1})
}

// endPublic ends the member's session with a public id.
func (h *Handler) endPublic(r *http.Request, s *session, public string) error {
	ctx := r.Context()
	recs, err := h.be.Records(ctx)
	if err != nil {
		return err
	}
	rec, err := recs.GetRecord(ctx, recordKindSeen, seenID(s.Email, public))
	if errors.Is(err, store.ErrNotFound) {
		return nil
	}
	if err != nil {
		return err
	}
	var v seen
	if json.Unmarshal(rec.Data, &v) != nil || v.Email != s.Email {
		return nil
	}
	if v.Session != "" {
		if err := recs.DeleteRecord(ctx, recordKindSession, v.Session); err != nil {
			return err
		}
	}
	return recs.DeleteRecord(ctx, recordKindSeen, rec.ID)
}

// agentSummary names the browser and system of a User-Agent ("Firefox on
// Linux"), without versions or anything else it carries.
func agentSummary(ua string) string {
	browser := "Unknown browser"
	for _, b := range []struct{ token, name string }{
		{"Edg/", "Edge"}, {"OPR/", "Opera"}, {"HeadlessChrome/", "Headless Chrome"}, {"Chrome/", "Chrome"},
		{"Firefox/", "Firefox"}, {"Safari/", "Safari"}, {"curl/", "curl"}, {"Go-http-client/", "Go HTTP client"},
	} {
		if strings.Contains(ua, b.token) {
			browser = b.name
			break
		}
	}
	for _, o := range []struct{ token, name string }{
		{"Android", "Android"}, {"iPhone", "iOS"}, {"iPad", "iPadOS"}, {"Windows", "Windows"},
		{"Mac OS X", "macOS"}, {"CrOS", "ChromeOS"}, {"Linux", "Linux"},
	} {
		if strings.Contains(ua, o.token) {
			return browser + " on " + o.name
		}
	}
	return browser
}

// humanDuration writes a whole number of hours or minutes in words ("1
// hour", "90 minutes").
func humanDuration(d time.Duration) string {
	n, unit := int64(d/time.Minute), "minute"
	if d%time.Hour == 0 {
		n, unit = int64(d/time.Hour), "hour"
	}
	if n == 1 {
		return "1 " + unit
	}
	return strconv.FormatInt(n, 10) + " " + unit + "s"
}
