package module

import (
	"encoding/json"
	"errors"
	"net/http"
	"slices"
	"strings"
	"time"

	"github.com/apimonetize/caddy-api-monetize/notify/notifier"
	"github.com/apimonetize/caddy-api-monetize/store"
)

// listNotifications serves GET /api_monetize/notifications: every
// notification with its delivery state, oldest event first. Query
// parameters customer=<id> and state=pending|delivered|dead filter it;
// state=dead is the dead-letter list.
func (a *adminAPI) listNotifications(w http.ResponseWriter, r *http.Request, rec store.Store) error {
	state := r.URL.Query().Get("state")
	switch state {
	case "", notifier.StatePending, notifier.StateDelivered, notifier.StateDead:
	default:
		return apiError(http.StatusBadRequest, "state: expected pending, delivered or dead, got "+state)
	}
	prefix := ""
	if c := r.URL.Query().Get("customer"); c != "" {
		prefix = c + "|"
	}
	all, err := notifier.Load(r.Context(), rec, prefix)
	if err != nil {
		return err
	}
	out := make([]notifier.Notification, 0, len(all))
	for _, nt := range all {
		if state == "" || nt.State == state {
			out = append(out, nt)
		}
	}
	slices.SortStableFunc(out, func(a, b notifier.Notification) int {
		if c := a.Event.At.Compare(b.Event.At); c != 0 {
			return c
		}
		if c := a.Event.Threshold - b.Event.Threshold; c != 0 {
			return c
		}
		return strings.Compare(a.ID, b.ID)
	})
	writeJSON(w, http.StatusOK, out)
	return nil
}

// replayNotification serves POST /api_monetize/notifications/{id}/replay:
// a delivered or dead-lettered notification is delivered again, with the
// same webhook-id and a fresh 24 h retry window. It answers 202 with the
// notification, 404 for an unknown id and 409 while it is pending.
func (a *adminAPI) replayNotification(w http.ResponseWriter, r *http.Request, rec store.Store) error {
	id := r.PathValue("id")
	rd, err := rec.GetRecord(r.Context(), notifier.RecordKind, id)
	if err != nil {
		if errors.Is(err, store.ErrNotFound) {
			return apiError(http.StatusNotFound, "no notification "+id)
		}
		return err
	}
	var nt notifier.Notification
	if err := json.Unmarshal(rd.Data, &nt); err != nil {
		return err
	}
	if nt.State == notifier.StatePending {
		return apiError(http.StatusConflict, "notification "+id+" is pending delivery already")
	}
	nt.State, nt.Attempts = notifier.StatePending, 0
	nt.FirstTry, nt.DeliveredAt = time.Time{}, time.Time{}
	nt.NextTry = time.Now().UTC()
	if _, err := notifier.Put(r.Context(), rec, nt, false); err != nil {
		return err
	}
	writeJSON(w, http.StatusAccepted, nt)
	return nil
}
